"""Sampling cost of the teacher and its students: wall time and NFE per clip window, in one run,
on the same `micro` network and the same inputs.

    python bench/sampling.py [--teacher CKPT] [--clips 1] [--repeats 3]

Rows: the teacher (25 DDIM steps x 3 CFG passes as one batch), the same teacher with its three
passes run one after another, and students of each distiller at 6 steps: PeRFlow / FADA-Balanced,
RFlow and TCD balanced (x 3 passes, FADA's 18-NFE table rows), TCD guided (1 pass, diffusers'
TCDScheduler with gamma 0.3), FADA-Fast (1 pass told the scales through CFG layers and tokens),
DMD (4 steps x 1 pass) and the one-step student of adversarial 4 -> 1 (1 x 1, TurboTalk stage 2).
Then the cost of one network call: a conditional pass, the teacher's
three-pass batch, a step of each Table 4 student variant, and the reference net's pass that makes a
window's bank (once per window: 1 condition, or Eq 9's 3 as one batch). The bound a student's
end-to-end speed-up is held to comes from these costs:

    (bank of 3 + 25 x three-pass step) / (bank of 1 + steps x one-pass step)

At one step the reference net's bank is a large share of a window: the last lines give that share,
the bound if the reference image's features were cached across windows (only the M motion frames
recomputed: each image goes through the reference net alone, so the cache would be exact), and the
frames per second one-step sampling makes against the 25 a live avatar needs.

Weights do not change the cost; without --teacher a random micro teacher is used.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distillers.adversarial import Adversarial
from distillers.dmd import DMD
from distillers.mixed import MixedPeRFlow
from distillers.perflow import PeRFlow
from distillers.rflow import RFlow
from distillers.tcd import TCD
from fada_lightning.diffusion.guidance import Conditions, cfg_conditions, multi_cfg
from fada_lightning.diffusion.sampling import NFECounter, denoiser_for, sample_loop
from fada_lightning.models.cfg import CFG_CONDITIONING
from fada_lightning.distill import DistillModule
from fada_lightning.module import TeacherModule
from fada_lightning.sample import load_module


def sequential_cfg_denoiser(net, cond: Conditions, ref_scale: float, audio_scale: float):
    """Eq 9 with the three passes as three calls (the batched `guided_denoiser` is the fast path)."""
    batched = cfg_conditions(cond)  # (3B): [(0,0); (r,0); (r,a)]
    passes = [batched.map(lambda x, i=i: x.chunk(3)[i]) for i in range(3)]
    banks = [net.encode_reference(c) for c in passes]
    return lambda z, t: multi_cfg(torch.cat([net(z, t, c, reference=b) for c, b in zip(passes, banks)]),
                                  ref_scale, audio_scale)


def own_denoiser(module):
    """How `module` samples (`denoiser_for` at its default scales): Eq 9's passes as one batch, one
    pass told the scales, or one conditional pass."""
    s_r, s_a = module.sampling_scales(None, None)
    return lambda net, cond: denoiser_for(net, cond, s_r, s_a)


def window_inputs(module, clips: int) -> tuple[Conditions, torch.Tensor]:
    """The same conditions and noise (clips, F, C, h, w) for every row."""
    a, f = module.preset["net"]["audio"], module.hparams.clip_frames
    latent = module.codec.encode(torch.zeros(1, 3, module.preset["frame_size"], module.preset["frame_size"]))
    g = torch.Generator().manual_seed(0)
    ref = torch.randn((clips, *latent.shape[1:]), generator=g)
    cond = Conditions(ref=ref, motion=ref[:, None].repeat(1, module.hparams.motion_frames, 1, 1, 1),
                      audio=torch.randn(clips, f, a["window"], a["layers"], a["dim"], generator=g))
    return cond, torch.randn((clips, f, *ref.shape[1:]), generator=g)


def time_windows(rows: list[tuple], clips: int, repeats: int) -> list[tuple[float, float]]:
    """rows of (module, denoiser factory, steps) -> (median seconds, NFE) to sample one clip window for
    `clips` clips, reference bank included. The rows take turns, so drift in the machine's speed hits
    all alike; the first round warms up allocators and kernels."""
    inputs = [window_inputs(module, clips) for module, _, _ in rows]
    times, nfe = [[] for _ in rows], [0.0] * len(rows)
    with torch.inference_mode():
        for i in range(repeats + 1):
            for j, ((module, factory, steps), (cond, noise)) in enumerate(zip(rows, inputs)):
                counter = NFECounter(module.sampling_net.eval(), clips)
                start = time.perf_counter()
                sample_loop(factory(counter, cond), noise, module.scheduler(), steps, eta=module.sample_eta)
                if i:
                    times[j].append(time.perf_counter() - start)
                nfe[j] = counter.nfe
    return [(statistics.median(t), n) for t, n in zip(times, nfe)]


def time_calls(calls: dict[str, tuple], banks: dict[str, tuple], rounds: int) -> dict[str, float]:
    """{name: (net, z, cond)} -> {name: median seconds of one call at t = 500}, each call's reference
    bank computed beforehand; {name: (net, cond)} -> the same for the reference pass making a bank.
    Everything takes turns, so drift in the machine's speed hits all alike."""
    times = {name: [] for name in [*calls, *banks]}
    with torch.inference_mode():
        made = {name: net.encode_reference(cond) for name, (net, z, cond) in calls.items()}
        for i in range(rounds + 1):  # round 0 warms up
            for name, (net, z, cond) in calls.items():
                start = time.perf_counter()
                net(z, torch.tensor(500), cond, reference=made[name])
                if i:
                    times[name].append(time.perf_counter() - start)
            for name, (net, cond) in banks.items():
                start = time.perf_counter()
                net.encode_reference(cond)
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def count_flops(net, z: torch.Tensor, cond: Conditions) -> int:
    """Flops of one network call (torch's FlopCounterMode: matmuls and convolutions): noise-free."""
    with torch.inference_mode():
        bank = net.encode_reference(cond)
        with FlopCounterMode(display=False) as counter:
            net(z, torch.tensor(500), cond, reference=bank)
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="a teacher checkpoint (default: a random micro teacher)")
    p.add_argument("--clips", type=int, default=1, help="clips sampled together")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = load_module(args.teacher) if args.teacher else TeacherModule(preset="micro", ema_decay=None)
    with tempfile.TemporaryDirectory() as tmp:  # the students read the teacher's settings from a checkpoint
        path = args.teacher or str(Path(tmp) / "teacher.ckpt")
        if not args.teacher:
            torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
        students = [(name, DistillModule(path, distiller)) for name, distiller in (
            ("PeRFlow Balanced student, 6 x 3", PeRFlow(mode="balanced")),
            ("RFlow student, 6 x 3", RFlow(mode="balanced")),
            ("TCD balanced student, 6 x 3", TCD(mode="balanced")),
            ("TCD guided student, 6 x 1", TCD(mode="guided")),
        )]
        fast = {kind: DistillModule(path, MixedPeRFlow(mode="guided", ref_scale=(1.0, 3.0), audio_scale=(1.0, 9.0)),
                                    cfg_conditioning=kind, ref_scale=2.0, audio_scale=6.5)
                for kind in CFG_CONDITIONING}
        students.append(("FADA-Fast student (CFG tokens), 6 x 1", fast["layer_tokens"]))
        students.append(("DMD student, 4 x 1", DistillModule(path, DMD())))
        students.append(("one-step student (adversarial), 1 x 1", DistillModule(path, Adversarial())))
    s_r, s_a = teacher.hparams.ref_scale, teacher.hparams.audio_scale
    rows = [("teacher, DDIM 25 x 3 passes batched", teacher, own_denoiser(teacher), 25),
            ("teacher, DDIM 25 x 3 passes one by one", teacher, lambda n, c: sequential_cfg_denoiser(n, c, s_r, s_a), 25)]
    rows += [(name, student, own_denoiser(student), student.hparams.sample_steps) for name, student in students]
    print(f"micro preset, {args.clips} clip(s) of {teacher.hparams.clip_frames} frames per window, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, rows taking turns")
    print(f"{'':40s} {'NFE':>5s} {'s/window':>9s} {'speed-up':>9s} {'fewer NFE':>10s}")
    measured = time_windows([row[1:] for row in rows], args.clips, args.repeats)
    for (name, *_), (seconds, nfe) in zip(rows, measured):
        print(f"{name:40s} {nfe:5g} {seconds:9.3f} {measured[0][0] / seconds:8.2f}x {measured[0][1] / nfe:9.2f}x")
    print(f"CFG passes batched vs one by one: {measured[1][0] / measured[0][0]:.2f}x faster")

    # one network call: what a sampler step costs, and the bound it puts on FADA-Fast's speed-up
    cond, z = window_inputs(teacher, args.clips)
    told = cond.with_guidance(2.0, 6.5)
    net = teacher.sampling_net.eval()
    calls = {"conditional pass": (net, z, cond),
             "teacher step: 3 passes as one batch": (net, z.repeat(3, 1, 1, 1, 1), cfg_conditions(cond))}
    calls.update({f"student step, cfg_conditioning {kind}": (module.sampling_net.eval(), z, told)
                  for kind, module in fast.items()})
    motion_only = Conditions(ref=cond.motion[:, 0], motion=cond.motion[:, 1:], audio=cond.audio)  # M images, not 1 + M
    banks = {"reference bank, 1 condition": (net, cond), "reference bank, 3 conditions batched": (net, cfg_conditions(cond)),
             f"reference pass, the {cond.motion.shape[1]} motion frames only": (net, motion_only)}
    rounds = args.repeats * 30
    seconds = time_calls(calls, banks, rounds)
    flops = {name: count_flops(*call) for name, call in calls.items()}
    one_pass = seconds["conditional pass"]
    print(f"\none network call (median of {rounds}, taking turns), relative to a conditional pass of the teacher's net:")
    print(f"{'':48s} {'time':>10s} {'ratio':>6s} {'flops ratio':>12s}")
    for name, t in seconds.items():
        ratio = f"{flops[name] / flops['conditional pass']:12.4f}" if name in flops else ""
        print(f"{name:48s} {t * 1e3:7.1f} ms {t / one_pass:6.3f} {ratio}")
    teacher_window = seconds["reference bank, 3 conditions batched"] + 25 * seconds["teacher step: 3 passes as one batch"]
    print("\nend to end against the bound from the measured call costs "
          "(bank of 3 + 25 x 3-pass step) / (bank of 1 + steps x 1-pass step):")
    for (name, student), (window, nfe) in zip(students, measured[2:]):
        if student.samples_with_cfg:
            continue
        step = seconds.get(f"student step, cfg_conditioning {student.hparams.cfg_conditioning}", one_pass)
        bound = teacher_window / (seconds["reference bank, 1 condition"] + student.hparams.sample_steps * step)
        speed_up = measured[0][0] / window
        print(f"{name:40s} {measured[0][1]:g} -> {nfe:g} NFE: {speed_up:6.2f}x of a {bound:6.2f}x bound "
              f"({speed_up / bound:.2f})")

    # one step: the reference net's share, a cache of the reference image's features, frames per second
    bank, motion = seconds["reference bank, 1 condition"], seconds[f"reference pass, the {cond.motion.shape[1]} motion frames only"]
    one_step_window, step = measured[-1][0], seconds["student step, cfg_conditioning none"]  # as the bound above
    frames = teacher.hparams.clip_frames * args.clips
    print(f"\none-step student: the reference bank is {bank / (bank + step):.0%} of a window's calls "
          f"(bank {bank * 1e3:.1f} ms + 1 step {step * 1e3:.1f} ms); with the reference image's features "
          f"cached across windows (the motion frames' pass only, {motion * 1e3:.1f} ms) the bound is "
          f"{teacher_window / (motion + step):.1f}x instead of {teacher_window / (bank + step):.1f}x "
          f"(75 NFE -> 1 alone: 75x)")
    print(f"frames per second on this CPU ({torch.get_num_threads()} threads): teacher {frames / measured[0][0]:.1f}, "
          f"DMD 4 steps {frames / measured[-2][0]:.1f}, one step {frames / one_step_window:.1f} "
          f"(calls alone, ref cached: {frames / (motion + step):.1f}); a live avatar needs 25")


if __name__ == "__main__":
    main()
