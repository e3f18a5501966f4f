"""Memory and cost of training at scale, read off the model itself on the meta device (docs/scaling.md).

    python -m fada_lightning.scaling [--preset sd15] [--frames 16] [--gpus 32] [--tflops 312] [--mfu 0.4]

Nothing is allocated: parameters are counted, saved activations are summed by a saved-tensors hook
during a forward on meta tensors, and FLOPs come from torch's FlopCounterMode on the same forward.
Network passes per training clip (with and without gradient, every network a training step runs)
are counted on a tiny preset (the count depends on the distiller only), for every bundled
configs/distill_<method>.yaml: a new distiller config appears here without an edit.
"""
from __future__ import annotations

import argparse
import functools
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .diffusion.guidance import Conditions
from .models.denoiser import AvatarDenoiser
from .presets import bundled_config_dir, load_config, load_preset

GIB = 2 ** 30
FPS = 25
# bytes per parameter: trainable fp32 weight + fp32 gradient + AdamW's two fp32 moments; EMA fp32;
# the frozen teacher as stored (fp32) or cast to bf16
TRAINED, EMA, TEACHER_FP32, TEACHER_BF16 = 4 + 4 + 8, 4, 4, 2


def meta_denoiser(preset: str | dict = "sd15", cfg_conditioning: str = "none") -> AvatarDenoiser:
    net = {k: v for k, v in load_preset(preset)["net"].items() if k != "pretrained"}
    with torch.device("meta"):
        return AvatarDenoiser(**net, cfg_conditioning=cfg_conditioning)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def example_inputs(net: AvatarDenoiser, batch: int, frames: int, motion: int = 2, device="meta", dtype=torch.float32):
    """(z, t, cond) of the shapes training feeds the net: latents (B, F, C, h, w), audio windows."""
    config = net.denoising_net.config
    c, s = config.in_channels, config.sample_size
    a = net.audio_projection
    z = torch.randn(batch, frames, c, s, s, device=device, dtype=dtype)
    cond = Conditions(ref=torch.randn(batch, c, s, s, device=device, dtype=dtype),
                      motion=torch.randn(batch, motion, c, s, s, device=device, dtype=dtype),
                      audio=torch.randn(batch, frames, a.window, 1, a.in_dim, device=device, dtype=dtype),
                      guidance=torch.ones(batch, 2, device=device, dtype=dtype) if net.takes_guidance else None)
    return z, torch.full((batch,), 500, device=device), cond


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, and the CPU's) keeps for backward:
    q, k, v, the output and one float32 log-sum-exp per query, never the (L, L) probabilities. On the
    meta device SDPA decomposes into the math path, which would keep them."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("only counts what a fused kernel saves")


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(q, k, v)


def saved_activation_bytes(net: AvatarDenoiser, batch: int, frames: int, checkpointing: bool = False,
                           dtype=torch.bfloat16, device="meta") -> int:
    """Bytes autograd keeps for backward over one training forward, in `dtype` (bf16: as under
    autocast), attention as a fused kernel keeps it (every saved tensor counted, views each time)."""
    net = net.to(dtype).set_activation_checkpointing(checkpointing)
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    z, t, cond = example_inputs(net, batch, frames, device=device, dtype=dtype)
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            net(z.requires_grad_(), t, cond)
    finally:
        F.scaled_dot_product_attention = sdpa
        net.set_activation_checkpointing(False)
    return total


def forward_flops(net: AvatarDenoiser, batch: int, frames: int, device="meta") -> int:
    """FLOPs of one forward (reference net + denoising net) for `batch` clips of `frames` frames."""
    z, t, cond = example_inputs(net, batch, frames, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(z, t, cond)
    return counter.get_total_flops()


class PassCounter:
    """Rows of the batches that `nets` run forward while in the `with` block (forward hooks), split by
    whether the pass's output needs a gradient (it then also costs its backward, about 2 forwards)."""

    def __init__(self, *nets: nn.Module):
        self.nets, self.rows, self.grad_rows, self.hooks = nets, 0, 0, []

    def __enter__(self) -> "PassCounter":
        self.hooks = [net.register_forward_hook(self.count) for net in self.nets]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def count(self, net, args, output):
        if output.requires_grad:
            self.grad_rows += args[0].shape[0]
        else:
            self.rows += args[0].shape[0]


def bundled_distillers() -> dict[str, dict]:
    """{config name: {class_path, init_args}} of every bundled configs/distill_<method>.yaml, plus the
    DistillModule options it sets (`module_options`): what the cost model prices, read, never listed."""
    rows = {}
    for path in sorted(bundled_config_dir().glob("distill_*.yaml")):
        init_args = load_config(path)["model"]["init_args"]
        options = {k: init_args[k] for k in ("cfg_conditioning", "cfg_tokens") if k in init_args}
        rows[path.name] = {**init_args["distiller"], "module_options": options}
    return rows


def distiller_of(spec: dict):
    """A `bundled_distillers()` entry -> (the distiller, the DistillModule options its config sets)."""
    from lightning.pytorch.cli import instantiate_class

    spec = dict(spec)
    options = spec.pop("module_options", {})
    return instantiate_class((), spec), options


def step_passes(distillers: dict[str, dict] | None = None, periods: int = 8) -> dict[str, tuple[float, float]]:
    """Network passes per training clip, (with gradient, without), for each distiller spec (default:
    `bundled_distillers()`, counted once per process): forward rows through every network (student,
    teacher, EMA, the distiller's own) over whole training steps (job + every update due), averaged over
    `periods` cycles of the update schedule, counted on a tiny random teacher, 4 clips a step."""
    if distillers is None:
        return dict(_bundled_step_passes(periods))
    return _step_passes(distillers, periods)


@functools.cache
def _bundled_step_passes(periods: int) -> dict[str, tuple[float, float]]:
    return _step_passes(bundled_distillers(), periods)


def _step_passes(distillers: dict[str, dict], periods: int) -> dict[str, tuple[float, float]]:
    from .distill import DistillModule
    from .testing import random_teacher_checkpoint

    passes = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = random_teacher_checkpoint(Path(tmp) / "teacher.ckpt", clip_frames=2)
        for name, spec in distillers.items():
            distiller, options = distiller_of(spec)
            module = DistillModule(path, distiller, ema_decay=0.9, **options)
            module.load_teacher()
            z, _, cond = example_inputs(module.net, 4, 2, device="cpu")
            everies = [distiller.student_every, *(o.every for o in distiller.optimization.values())]
            steps = periods * math.lcm(*everies)
            torch.manual_seed(0)
            # every network of the teacher's size, once, wherever it sits (F's score, D's backbone, G4)
            owners = [module.net, module.teacher, module.ema.module, *distiller.frozen.values(), *distiller.networks.values()]
            nets = list({id(m): m for owner in owners for m in owner.modules() if isinstance(m, AvatarDenoiser)}.values())
            with PassCounter(*nets) as counter:
                for step in range(steps):
                    with torch.no_grad():
                        job = distiller.make_targets(module.teacher, z, cond, distiller.sample_time(4, z.device),
                                                     torch.randn_like(z), tiers=["strict", "lenient"] * 2)
                    for update in distiller.updates(step):
                        distiller.update_loss(update, module.net, job)
            passes[f"{name} ({type(distiller).__name__}, {distiller.nfe()} NFE)"] = (
                counter.grad_rows / (4 * steps), counter.rows / (4 * steps))
    return passes


def trained_parameters(spec: dict, preset: str | dict = "sd15") -> tuple[int, int, int]:
    """Parameters of a distiller's networks at `preset` (meta device): (the student, the student and the
    networks the distiller trains, the frozen networks it keeps beside the teacher: G4)."""
    from fada_lightning.diffusion import schedule as S

    distiller, options = distiller_of(spec)
    student = meta_denoiser(preset, options.get("cfg_conditioning", "none"))
    distiller.bind(S.SD15_SCHEDULE, "epsilon", student_ema=student)  # the EMA only stands in: it is not trained
    distiller.set_teacher(meta_denoiser(preset), student)
    return (count(student), count(student) + sum(count(net) for net in distiller.networks.values()),
            sum(count(net) for net in distiller.frozen.values()))


def state_gib_per_gpu(student: int, teacher: int, gpus: int, sharded: bool, teacher_bf16: bool = True,
                      trained: int | None = None) -> dict:
    """Weights, gradients and optimizer state per GPU: DDP keeps all of it on every GPU, FSDP 1 / gpus.
    `trained`: every trained parameter (the student and a distiller's own networks), default the student's."""
    share = 1 / gpus if sharded else 1
    parts = {"trained + grads + AdamW": (student if trained is None else trained) * TRAINED, "student EMA": student * EMA,
             "teacher": teacher * (TEACHER_BF16 if teacher_bf16 else TEACHER_FP32)}
    return {k: v * share / GIB for k, v in parts.items()}


def gpu_hours(hours_of_video: float, frames: int, step_flops_per_clip: float, tflops: float, mfu: float) -> float:
    """GPU-hours of one pass over `hours_of_video` cut into clips of `frames` frames."""
    clips = hours_of_video * 3600 * FPS / frames
    return clips * step_flops_per_clip / (tflops * 1e12 * mfu) / 3600


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--gpus", type=int, default=32)
    p.add_argument("--tflops", type=float, default=312.0, help="peak bf16 TFLOP/s per GPU (A100: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak a training step reaches")
    args = p.parse_args(argv)
    teacher, student = meta_denoiser(args.preset), meta_denoiser(args.preset, "layer_tokens")
    print(f"{args.preset}: teacher {count(teacher) / 1e6:.1f} M parameters, FADA-Fast student "
          f"{count(student) / 1e6:.1f} M; batch 1 clip of {args.frames} frames per GPU, {args.gpus} GPUs\n")
    print(f"{'per GPU (GiB)':30s} {'DDP':>8s} {'FSDP':>8s}")
    ddp, fsdp = (state_gib_per_gpu(count(student), count(teacher), args.gpus, s) for s in (False, True))
    for key in ddp:
        print(f"{key:30s} {ddp[key]:8.2f} {fsdp[key]:8.2f}")
    for checkpointing in (False, True):
        acts = saved_activation_bytes(student, 1, args.frames, checkpointing) / GIB
        label = "activations (bf16)" + (", checkpointed" if checkpointing else "")
        print(f"{label:30s} {acts:8.2f} {acts:8.2f}")
    fwd = forward_flops(teacher, 1, args.frames)
    print(f"\none forward, 1 clip of {args.frames} frames: {fwd / 1e12:.2f} TFLOP")
    distillers = bundled_distillers()
    print(f"\n{'distiller':46s} {'passes: grad':>12s} {'no grad':>8s} {'TFLOP/clip':>10s} {'GPU-h 160 h':>11s} "
          f"{'GPU-h 1300 h':>12s}")
    for name, (grad, no_grad) in {"teacher (Eq 1)": (1.0, 0.0), **step_passes()}.items():  # the bundled ones
        step = (3 * grad + no_grad) * fwd  # a pass with gradient: forward + backward (~2 forwards)
        a, b = (gpu_hours(h, args.frames, step, args.tflops, args.mfu) for h in (160, 1300))
        print(f"{name:46s} {grad:12.2f} {no_grad:8.2f} {step / 1e12:10.1f} {a:11,.0f} {b:12,.0f}")
    counts = sorted({8, args.gpus})
    print("\nper GPU (GiB): weights, gradients and optimizer state of every trained network, student EMA, the teacher "
          "and any other frozen network (bf16)")
    print(f"{'distiller':30s} {'trained (M)':>11s} {'DDP':>8s}" + "".join(f" {f'FSDP {g}':>8s}" for g in counts))
    for name, spec in distillers.items():
        own, trained, frozen = trained_parameters(spec, args.preset)
        state = [sum(state_gib_per_gpu(own, count(teacher) + frozen, gpus, sharded, trained=trained).values())
                 for gpus, sharded in [(1, False), *((g, True) for g in counts)]]
        print(f"{name:30s} {trained / 1e6:11.1f}" + "".join(f" {gib:8.2f}" for gib in state))
    print(f"\nGPU-hours: one pass over the data at {args.tflops:g} TFLOP/s x {args.mfu:.0%} utilisation")


if __name__ == "__main__":
    main()
