"""Contract v2 is open: a distiller written here, by subclassing only, trains a network of its own.

`ProbedPeRFlow` is PeRFlow plus a probe: a 1x1 convolution on the student's input latents that learns
to predict the eps target (a linear denoiser), with its own AdamW, updated every 2nd step. The
student's loss also asks it to agree with the probe, so the student's backward reaches the probe
too: the framework must keep those gradients off the probe's update. The same class runs in the
2-process DDP and FSDP2 tests (tests/test_distributed.py).
"""
import pytest
import torch
from torch import nn

from distillers.base import Optimization
from distillers.perflow import PeRFlow
from fada_lightning.distill import DistillModule
from fada_lightning.testing import DistillerContract, random_batch


class Probe(nn.Module):
    """(B, F, C, h, w) -> (B, F, C, h, w): one 1x1 convolution over channels, frame by frame, starting
    at zero (the same on every rank and in every process count, without drawing random numbers)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, z):
        return self.conv(z.flatten(0, 1)).unflatten(0, z.shape[:2])


class ProbedPeRFlow(PeRFlow):
    def __init__(self, agreement: float = 0.1, probe_lr: float = 1e-3, probe_every: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.agreement, self.probe = agreement, Optimization(lr=probe_lr, every=probe_every, grad_clip=1.0)

    def build_networks(self, teacher, student):
        self.add_network("probe", Probe(teacher.denoising_net.config.in_channels), self.probe)

    def student_loss(self, student, job):
        pred = student(job.z, job.timestep, job.cond)
        loss, logs = self.loss(pred, job)
        agree = (self.to_eps(pred.float(), job.z, job.abar) - self.networks["probe"](job.z)).pow(2).mean()
        return loss + self.agreement * agree, {**logs, "probe_agreement": agree.detach()}

    def network_loss(self, name, student, job):
        return (self.networks[name](job.z) - job.eps_target).pow(2).mean(), {}


class TestProbedPeRFlow(DistillerContract):
    def make_distiller(self):
        return ProbedPeRFlow(solver_steps=1, num_windows=2, sample_steps=2)


def test_the_schedule_of_updates():
    d = ProbedPeRFlow(probe_every=3)
    d.student_every = 2
    d.add_network("probe", Probe(4), d.probe)
    assert [d.updates(s) for s in range(4)] == [["student", "probe"], [], ["student"], ["probe"]]


def test_a_step_with_no_update_is_refused(teacher_ckpt):
    model = DistillModule(teacher_ckpt, ProbedPeRFlow(solver_steps=1, num_windows=2, sample_steps=2, probe_every=2))
    model.distiller.student_every = 2
    model.load_teacher()
    assert model.distiller.updates(1) == []


def test_an_unbound_distiller_says_who_binds_it():
    with pytest.raises(RuntimeError, match="no noise schedule yet: DistillModule binds it"):
        ProbedPeRFlow().sample_time(2, "cpu")


def test_the_networks_are_built_only_where_the_module_trains(teacher_ckpt):
    model = DistillModule(teacher_ckpt, ProbedPeRFlow(solver_steps=1, num_windows=2, sample_steps=2))
    assert len(model.distiller.networks) == 0  # built with the teacher, never to sample
    model.load_teacher()
    assert list(model.networks()) == ["net", "ema", "teacher", "distiller.probe"]
    assert list(model.trained_networks()) == ["student", "probe"]
    loss, logs = model.distillation_loss(random_batch())
    assert torch.isfinite(loss) and "probe_agreement" in logs
