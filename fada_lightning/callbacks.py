"""Callbacks the bundled configs use."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes `last.ckpt` when fit stops at a step its
    `every_n_train_steps` did not save (`--trainer.max_steps 250` with checkpoints every 200),
    so the last steps of a run are never lost."""

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
