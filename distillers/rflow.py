"""RFlow: rectified-flow distillation, PeRFlow with a single window (SPEC section 3).

The teacher solves the whole way from noise (t = 1) to data (t = 0) and the student learns the
straight line between the two; its sampler is `PeRFlowScheduler` with one window (n even steps).
The same code as PeRFlow with K = 1, so the only cost difference is the teacher's longer solve:
`solver_steps` defaults to 32, PeRFlow's 4 windows x 8 steps over the same trajectory.
"""
from __future__ import annotations

from .perflow import PeRFlow


class RFlow(PeRFlow):
    def __init__(self, solver_steps: int = 32, mode: str = "balanced", ref_scale: float = 2.5,
                 audio_scale: float = 6.5, p_drop_audio: float = 0.05, p_drop_ref_audio: float = 0.05,
                 p_drop_motion: float = 0.05, min_snr_gamma: float | None = None, sample_steps: int = 6):
        super().__init__(1, solver_steps, mode, ref_scale, audio_scale, p_drop_audio, p_drop_ref_audio,
                         p_drop_motion, min_snr_gamma, sample_steps)
