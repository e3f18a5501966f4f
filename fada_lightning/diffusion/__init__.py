from .scheduling_perflow import PeRFlowScheduler

__all__ = ["PeRFlowScheduler"]
