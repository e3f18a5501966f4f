"""bench/cfg_scale_response.py: the student's move is what the scales alone do, on one input."""
import importlib.util
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def _bench():
    spec = importlib.util.spec_from_file_location("cfg_scale_response",
                                                  Path(__file__).resolve().parents[1] / "bench" / "cfg_scale_response.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_student_that_ignores_the_scales_does_not_move(teacher_ckpt, shards):
    from distillers.perflow import PeRFlow
    from fada_lightning.distill import DistillModule
    from fada_lightning.evaluate import eval_clips
    from fada_lightning.sample import load_module

    bench = _bench()
    student = DistillModule(teacher_ckpt, PeRFlow(mode="guided"), cfg_conditioning="layer_tokens").eval()
    teacher = load_module(teacher_ckpt).eval()
    dataset, _ = eval_clips(student, 2, 8, shards, None)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    low, high = bench.CHANGES["s_r 1 -> 3 (s_a 6.5)"]
    jobs = {scales: bench.window_job(student, teacher.sampling_net, batch, scales, 0.7) for scales in (low, high)}
    # the scales move the PeRFlow window's input as well as the target: the student must see one input
    assert not torch.equal(jobs[high].z, jobs[low].z)
    # a fresh CFG layer starts at zero output: the student ignores the scales, so on one input it does not move
    d_target, d_student, error = bench.moves(student, jobs, low, high)
    assert d_target.abs().mean() > 1e-4 and error > 0
    assert not d_student.any()
    own_inputs = bench.student_eps(student, jobs[high], high) - bench.student_eps(student, jobs[low], low)
    assert own_inputs.abs().mean() > 0  # what it would move fed each scale's own input
    tokens = student.sampling_net.cfg_embedding
    assert bench.token_moves(tokens, tokens).count("by 0.000 of") == 2
    assert bench.initial_tokens(teacher_ckpt) is None  # no run folder's config.yaml beside it
    directions = bench.token_directions(student.sampling_net)
    assert "cos(T_r - T_0, T_ar - T_r)" in directions and bench.token_directions(teacher.sampling_net).startswith("no tokens")


def test_the_scale_codes_of_nearby_scales_part_quickly():
    """LCM's embedding of 1000 s: the same scales give the same code, half a unit apart an unlike one."""
    bench = _bench()
    assert abs(bench.code_cosine((2.0, 4.0), (2.0, 4.0)) - 1) < 1e-6
    assert bench.code_cosine((2.0, 4.0), (2.0, 4.01)) > bench.code_cosine((2.0, 4.0), (2.0, 4.5))
