"""FinalCheckpoint: the end of a run is saved even between periodic checkpoints. Plateau: the budget rule
that stops a run once its held-out loss stops improving."""
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fada_lightning.callbacks import FinalCheckpoint, Plateau


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


def test_a_run_stopped_by_sigterm_saves_the_step_it_stopped_after(tmp_path):
    """`kill`, a preemption or `fada ablate` stopping its runs: the run resumes from step 7, not from 5."""

    class Stopped(BoringModel):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == 7:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this step

    checkpoint = FinalCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100, save_top_k=-1,
                                 last_every_n_steps=5)
    trainer = Trainer(max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, callbacks=[checkpoint], default_root_dir=tmp_path)
    with pytest.raises(SIGTERMException):
        trainer.fit(Stopped())
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 7
    resumed = Trainer(max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, default_root_dir=tmp_path)
    resumed.fit(BoringModel(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 20


class Scripted(BoringModel):
    """Logs val/loss = losses[k] at its k-th validation."""

    def __init__(self, losses):
        super().__init__()
        self.losses, self.validations = losses, 0

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses[self.validations])

    def on_validation_epoch_end(self):
        self.validations += 1


def plateau_trainer(tmp_path, *callbacks, max_steps=100, limit_val_batches=1):
    return Trainer(max_steps=max_steps, val_check_interval=5, check_val_every_n_epoch=None,
                   limit_val_batches=limit_val_batches,
                   num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                   callbacks=list(callbacks), default_root_dir=tmp_path)


def test_plateau_stops_after_patience_validations_without_a_relative_gain(tmp_path):
    # best 1.0 -> 0.5; 0.499 and 0.497 are gains below 1% of 0.5; 0.3 would be one, but comes too late
    losses = [1.0, 0.5, 0.499, 0.497, 0.3, 0.2]
    plateau = Plateau(patience=2, min_rel_delta=0.01)
    plateau_trainer(tmp_path, plateau).fit(Scripted(losses))
    assert plateau.stopped_at == 20 and plateau.best == 0.5
    steps, values = zip(*plateau.history)
    assert steps == (5, 10, 15, 20) and values == pytest.approx(losses[:4])


def test_plateau_waits_for_min_steps_and_max_steps_stays_the_cap(tmp_path):
    plateau = Plateau(patience=1, min_rel_delta=0.01, min_steps=15)
    plateau_trainer(tmp_path, plateau).fit(Scripted([1.0, 1.0, 1.0, 1.0]))
    assert plateau.stopped_at == 15
    still_improving = Plateau(patience=1)
    trainer = plateau_trainer(tmp_path, still_improving, max_steps=20)
    trainer.fit(Scripted([1.0, 0.5, 0.25, 0.125]))
    assert still_improving.stopped_at is None and trainer.global_step == 20


def test_plateau_resumes_with_its_count(tmp_path):
    def checkpoint():
        return FinalCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100, save_top_k=-1)

    first = Plateau(patience=2)
    plateau_trainer(tmp_path, first, checkpoint(), max_steps=15).fit(Scripted([1.0, 0.5, 0.5]))
    assert first.waited == 1 and first.stopped_at is None
    second = Plateau(patience=2)  # a killed run's restart: the count goes on from the checkpoint
    model = Scripted([1.0, 0.5, 0.5, 0.5, 0.1])
    model.validations = 3
    plateau_trainer(tmp_path, second, checkpoint()).fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert second.stopped_at == 20 and second.history[:3] == [(5, 1.0), (10, 0.5), (15, 0.5)]


def test_a_run_killed_after_a_validation_at_a_checkpoint_step_resumes_as_if_not_killed(tmp_path):
    """last.ckpt is written at step 10's batch end, before step 10's validation (0.5, a new best). The run
    ends there as a kill would; resumed, it must know that validation: Plateau stops at 20 as the
    uninterrupted run does (0.5 at 15 and 20 are no gain), and best.ckpt's callback knows its best is 0.5."""
    losses = [1.0, 0.5, 0.5, 0.5, 0.1]

    def callbacks(folder=tmp_path):
        return (Plateau(patience=2), FinalCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=100,
                                                      save_top_k=-1, last_every_n_steps=5),
                ModelCheckpoint(dirpath=folder, monitor="val/loss", filename="best", save_top_k=1,
                                enable_version_counter=False))

    uninterrupted = callbacks(tmp_path / "whole")
    plateau_trainer(tmp_path / "whole", *uninterrupted).fit(Scripted(losses))
    assert uninterrupted[0].stopped_at == 20

    plateau_trainer(tmp_path, *callbacks(), max_steps=10).fit(Scripted(losses))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    best_state = next(v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saved["global_step"] == 10 and float(best_state["best_model_score"]) == 0.5
    resumed, model = callbacks(), Scripted(losses)
    model.validations = 2
    plateau_trainer(tmp_path, *resumed).fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert resumed[0].history == uninterrupted[0].history and resumed[0].stopped_at == 20
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 10


def test_a_sigterm_during_a_validation_waits_for_it_and_the_resumed_run_loses_nothing(tmp_path):
    """SIGTERM in the first of step 10's two validation batches: Lightning would stop there, and a run resumed
    from step 10 would never redo that validation (0.5, a new best). It ends first; last.ckpt at step 10 knows
    it, and the resumed run's Plateau history, stop and best.ckpt are the uninterrupted run's."""
    losses = [1.0, 0.5, 0.5, 0.5, 0.1]

    class KilledInValidation(Scripted):
        def validation_step(self, batch, batch_idx):
            if self.global_step == 10 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            super().validation_step(batch, batch_idx)

    def callbacks(folder=tmp_path):
        return (Plateau(patience=2), FinalCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=5,
                                                      save_top_k=-1),
                ModelCheckpoint(dirpath=folder, monitor="val/loss", filename="best", save_top_k=1,
                                enable_version_counter=False))

    uninterrupted = callbacks(tmp_path / "whole")
    plateau_trainer(tmp_path / "whole", *uninterrupted, limit_val_batches=2).fit(Scripted(losses))
    assert uninterrupted[0].history == [(5, 1.0), (10, 0.5), (15, 0.5), (20, 0.5)]

    killed = callbacks()
    with pytest.raises(SIGTERMException):
        plateau_trainer(tmp_path, *killed, limit_val_batches=2).fit(KilledInValidation(losses))
    assert killed[0].history == uninterrupted[0].history[:2]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 10
    resumed, model = callbacks(), Scripted(losses)
    model.validations = 2
    plateau_trainer(tmp_path, *resumed, limit_val_batches=2).fit(model, ckpt_path=tmp_path / "last.ckpt")
    assert resumed[0].history == uninterrupted[0].history and resumed[0].stopped_at == 20
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 10


def test_plateau_stops_a_run_whose_loss_is_not_finite_even_before_min_steps(tmp_path):
    plateau = Plateau(patience=5, min_steps=50)
    plateau_trainer(tmp_path, plateau).fit(Scripted([1.0, float("nan"), 0.5]))
    assert plateau.stopped_at == 10


def test_plateau_names_a_metric_the_validation_did_not_log(tmp_path):
    with pytest.raises(KeyError, match="val/other"):
        plateau_trainer(tmp_path, Plateau(monitor="val/other")).fit(Scripted([1.0]))


def test_the_plateau_budget_keeps_the_checkpoint_of_its_lowest_held_out_loss(tmp_path):
    """budgets/plateau.yaml's callbacks, as shipped: the run stops on its plateau and best.ckpt is the step
    of the lowest val/loss (10 here), not the last (30), so a loss that rises before the stop costs nothing."""
    import yaml
    from lightning.pytorch.cli import instantiate_class

    from fada_lightning.presets import bundled_config_dir

    shipped = yaml.safe_load((bundled_config_dir() / "budgets" / "plateau.yaml").read_text())["trainer"]["callbacks+"]
    here = {"Plateau": {"min_steps": 0}, "ModelCheckpoint": {"dirpath": tmp_path}}
    callbacks = [instantiate_class((), {**c, "init_args": {**c["init_args"], **here[c["class_path"].split(".")[-1]]}})
                 for c in shipped]
    plateau_trainer(tmp_path, *callbacks).fit(Scripted([1.0, 0.5, 0.7, 0.6, 0.55, 0.9, 0.4]))
    assert callbacks[0].stopped_at == 30 and [p.name for p in tmp_path.glob("*.ckpt")] == ["best.ckpt"]
    assert torch.load(tmp_path / "best.ckpt", weights_only=False)["global_step"] == 10


def test_plateau_says_how_many_of_the_students_updates_its_budget_is(tmp_path, caplog):
    model = Scripted([1.0] * 4)
    model.distiller = SimpleNamespace(student_every=5)  # DMD's G steps every 5th training step
    with caplog.at_level("INFO"):
        plateau_trainer(tmp_path, Plateau(), max_steps=20).fit(model)
    assert "once every 5 of them: a validation every 1 of its updates, a cap of 4" in caplog.text
