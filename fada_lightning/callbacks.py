"""Callbacks the bundled configs use."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that never loses more than a few steps of a run.

    - It writes `last.ckpt` when fit stops at a step its `every_n_train_steps` did not save
      (`--trainer.max_steps 250` with checkpoints every 200).
    - `last_every_n_steps` also refreshes `last.ckpt` (only) that often between the kept checkpoints,
      so a killed run resumes from at most that many steps back. Steps are counted alike on every
      rank, so all ranks take part in the (possibly sharded) save together.
    """

    def __init__(self, *args, last_every_n_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if last_every_n_steps < 0:
            raise ValueError(f"last_every_n_steps must be >= 0 (0: off), got {last_every_n_steps}")
        self.last_every_n_steps = last_every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if (self.last_every_n_steps and step % self.last_every_n_steps == 0
                and step > self._last_global_step_saved and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
