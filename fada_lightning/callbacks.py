"""Callbacks the bundled configs use."""
from __future__ import annotations

import math

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class FinalCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that never loses more than a few steps of a run.

    - It writes `last.ckpt` when fit stops at a step its `every_n_train_steps` did not save
      (`--trainer.max_steps 250` with checkpoints every 200).
    - `last_every_n_steps` also refreshes `last.ckpt` (only) that often between the kept checkpoints,
      so a killed run resumes from at most that many steps back. Steps are counted alike on every
      rank, so all ranks take part in the (possibly sharded) save together.
    - A checkpoint written at a step's batch end predates that step's validation, and a run resumed
      from it never redoes that validation: it is written again after it, so what the validation told
      the callbacks (Plateau's count, the best val/loss) is not lost to a kill.
    - A run stopped by SIGTERM writes `last.ckpt` at the step it stopped after, and loses nothing. A SIGTERM
      that comes during a validation of the fit is held until that validation ends, so the checkpoint knows it.
    """

    def __init__(self, *args, last_every_n_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if last_every_n_steps < 0:
            raise ValueError(f"last_every_n_steps must be >= 0 (0: off), got {last_every_n_steps}")
        self.last_every_n_steps = last_every_n_steps
        self._before_validation: list[str] = []  # written at this step's batch end
        self._held_sigterm = False  # a SIGTERM that came during this validation

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.training:
            self._before_validation.append(filepath)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before_validation = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Lightning stops a validation at the next batch once SIGTERM has come, and a run resumed from this
        # step never redoes it: Plateau's count, best.ckpt's pick and the curve lose that point for good.
        # So the flag is held until on_validation_end; the training loop stops right after it (on_exception).
        signals = trainer._signal_connector  # what `trainer.received_sigterm` reads; no public setter
        if signals.received_sigterm and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            signals.received_sigterm, self._held_sigterm = False, True

    def on_validation_end(self, trainer, pl_module):
        if self._held_sigterm:
            trainer._signal_connector.received_sigterm, self._held_sigterm = True, False
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or not self._before_validation:
            return
        # Lightning calls checkpoint callbacks last, in order: those after this one (best.ckpt's) have not
        # seen this validation yet. They do now; their own call follows at a step they saved or judged
        # already, a no-op for a ModelCheckpoint.
        for later in trainer.checkpoint_callbacks[trainer.checkpoint_callbacks.index(self) + 1:]:
            later.on_validation_end(trainer, pl_module)
        for path in dict.fromkeys(self._before_validation):
            super()._save_checkpoint(trainer, path)
        self._before_validation = []

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

    def on_exception(self, trainer, pl_module, exception):
        super().on_exception(trainer, pl_module, exception)
        # SIGTERM (`kill`, a scheduler's preemption, `fada ablate` stopping its runs): Lightning raises it
        # between training steps, after the step's validation (held till its end, above), so last.ckpt
        # there is whole and the run resumes where it stopped. Raised elsewhere, the state is not whole.
        # (Lightning's save_on_exception saves on any exception, a Ctrl-C mid-step too, and a step file.)
        if (isinstance(exception, SIGTERMException) and self.save_last and trainer.training
                and trainer.global_step > self._last_global_step_saved):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class Plateau(Callback):
    """Stops a run once its held-out `monitor` has plateaued: `patience` validations in a row none of
    which improved on the best so far by `min_rel_delta` of it. `trainer.max_steps` stays the cap.

    One rule for every row of an ablation gives each model the budget its own loss asks for, rather
    than a fixed step count that undertrains one method and overtrains another. Lightning's EarlyStopping
    takes an absolute min_delta; the distillers' held-out losses are on different scales (PeRFlow's eps
    error was ~2e-3 at micro size, DMD's is an x0 gap, the adversarial stage's a squared x0 distance),
    so one rule for all needs a relative gain. `history` keeps
    (step, value) of every validation; it and the count survive a resume (the checkpoint's callback state).
    """

    def __init__(self, monitor: str = "val/loss", patience: int = 3, min_rel_delta: float = 0.01, min_steps: int = 0):
        super().__init__()
        if patience < 1 or min_rel_delta < 0:
            raise ValueError(f"Plateau needs patience >= 1 and min_rel_delta >= 0, got {patience}, {min_rel_delta}")
        self.monitor, self.patience, self.min_rel_delta, self.min_steps = monitor, patience, min_rel_delta, min_steps
        self.best: float | None = None
        self.waited = 0
        self.history: list[tuple[int, float]] = []
        self.stopped_at: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def on_fit_start(self, trainer, pl_module):
        # The budget counts training steps. A student that steps every k-th of them (DMD's G) gets 1/k of
        # that many updates: say so, since the shipped tables scale the budget by k for such a row.
        every = getattr(getattr(pl_module, "distiller", None), "student_every", 1)
        if every > 1 and isinstance(trainer.val_check_interval, int):
            rank_zero_info(f"[fada] Plateau counts training steps, and the student updates once every {every} of "
                           f"them: a validation every {trainer.val_check_interval / every:g} of its updates, a cap of "
                           f"{trainer.max_steps / every:g}")

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"Plateau monitors {self.monitor!r}, which the validation did not log (logged: "
                           f"{', '.join(sorted(trainer.callback_metrics)) or 'nothing'})")
        value, step = float(trainer.callback_metrics[self.monitor]), trainer.global_step
        self.history.append((step, value))
        if self.best is None or value < self.best - self.min_rel_delta * abs(self.best):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        diverged = not math.isfinite(value)  # stops at once: nothing after it can improve on the best
        plateaued = diverged or (self.waited >= self.patience and step >= self.min_steps)
        if trainer.strategy.reduce_boolean_decision(plateaued, all=False):
            trainer.should_stop, self.stopped_at = True, step
            rank_zero_info(f"[fada] {self.monitor} is {value} at step {step}: stopping" if diverged else
                           f"[fada] {self.monitor} has plateaued at {self.best:.5g} (no {self.min_rel_delta:.0%} gain "
                           f"in {self.waited} validations): stopping at step {step}")

    def state_dict(self) -> dict:
        return {"best": self.best, "waited": self.waited, "history": self.history, "stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.waited, self.stopped_at = state_dict["best"], state_dict["waited"], state_dict["stopped_at"]
        self.history = [tuple(h) for h in state_dict["history"]]
