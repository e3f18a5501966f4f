"""FinalCheckpoint: the end of a run is saved even between periodic checkpoints."""
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from fada_lightning.callbacks import FinalCheckpoint


def test_a_run_that_stops_between_checkpoints_still_saves_its_last_step(tmp_path):
    checkpoint = FinalCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=-1)
    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[checkpoint], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_last_checkpoint_is_refreshed_between_kept_checkpoints(tmp_path):
    """A run killed after step 5 resumes from step 4, not from the last kept checkpoint at 0."""
    saved_at = []

    class Watch(BoringModel):
        def on_save_checkpoint(self, checkpoint):
            saved_at.append(checkpoint["global_step"])

    checkpoint = FinalCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100, save_top_k=-1,
                                 last_every_n_steps=2)
    trainer = Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[checkpoint], default_root_dir=tmp_path)
    trainer.fit(Watch())
    assert saved_at == [2, 4, 5]           # every 2 steps, then the end of the run
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 5
