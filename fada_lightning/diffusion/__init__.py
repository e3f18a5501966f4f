from .scheduling_dmd import DMDScheduler
from .scheduling_perflow import PeRFlowScheduler

__all__ = ["DMDScheduler", "PeRFlowScheduler"]
