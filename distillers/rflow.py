"""RFlow: rectified-flow distillation, PeRFlow with a single window (SPEC section 3).

The teacher solves the whole way from noise (t = 1) to data (t = 0) and the student learns the
straight line between the two; its sampler is `PeRFlowScheduler` with one window (n even steps).
The same code as PeRFlow with K = 1, so the only cost difference is the teacher's longer solve:
`solver_steps` defaults to 32, PeRFlow's 4 windows x 8 steps over the same trajectory.
"""
from __future__ import annotations

from .perflow import PeRFlow


class RFlow(PeRFlow):
    def __init__(self, solver_steps: int = 32, **kwargs):
        super().__init__(num_windows=1, solver_steps=solver_steps, **kwargs)
