"""Live generation's latency: time to first frame and steady frames per second against the 25 fps a live
avatar needs, for the teacher, FADA-Fast, DMD (4 steps) and the one-step student, in one run.

    python bench/streaming.py [--seconds 10] [--chunk-ms 200] [--tflops 312] [--mfu 0.4]

micro, measured on this machine: each model, built from its bundled config (random weights: they do
not change the cost), goes through `fada export`'s pipeline (`pipeline_of`) and `FadaAvatarPipeline.stream`,
fed `--seconds` of speech in `--chunk-ms` chunks. The first clip window can start only once the speech
its audio windows read has arrived (clip frames + the audio window's radius + the features' context:
SpeechStream), so

    time to first frame = that speech's duration + the first window's compute
    steady fps          = frames after the first window / the time they took

sd15, from the cost model for one GPU (nothing allocated: FLOPs counted on the meta device): a window
costs the reference net's bank (once; Eq 9's 3 conditions for the teacher), NFE denoising passes
of its frames and the VAE decoding them, at --tflops x --mfu. Audio features are left out of both.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fada_lightning.diffusion.guidance import cfg_conditions  # noqa: E402
from fada_lightning.distill import DistillModule  # noqa: E402
from fada_lightning.export import pipeline_of  # noqa: E402
from fada_lightning.models.codec import VAECodec  # noqa: E402
from fada_lightning.module import TeacherModule  # noqa: E402
from fada_lightning.pipeline import SpeechStream  # noqa: E402
from fada_lightning.scaling import bundled_distillers, distiller_of, example_inputs, meta_denoiser  # noqa: E402

FPS, SAMPLES_PER_FRAME = 25, 640
# (row, bundled distill config or None for the teacher)
MODELS = [("Teacher (25 DDIM steps x 3 CFG passes)", None), ("FADA-Fast", "distill_fada_fast.yaml"),
          ("DMD (4 steps)", "distill_dmd.yaml"), ("One-step (TurboTalk stage 2)", "distill_turbo.yaml")]
# Stable Diffusion 1.5's VAE (its vae/config.json): the decoder the sd15 preset runs on every frame
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)


def micro_models(folder: Path) -> list[tuple[str, object]]:
    """(row, module): a random micro teacher and a student of each bundled config distilling it."""
    torch.manual_seed(0)
    teacher = TeacherModule(preset="micro", ema_decay=None)
    path = folder / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, path)
    specs = bundled_distillers()
    models = []
    for name, config in MODELS:
        if config is None:
            models.append((name, teacher))
            continue
        distiller, options = distiller_of(specs[config])
        models.append((name, DistillModule(str(path), distiller, **options)))
    return models


def time_stream(pipe, seconds: float, chunk_ms: float) -> dict:
    """Stream `seconds` of speech through the pipeline: the speech the first window waits for, the first
    window's compute, and the steady rate after it."""
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    step = int(16000 * chunk_ms / 1000)
    image = rng.integers(0, 256, (pipe.config.frame_size, pipe.config.frame_size, 3), dtype=np.uint8)
    stream = SpeechStream(pipe.audio_encoder, pipe.config.clip_frames, pipe.denoiser.audio_projection.window // 2)
    wait_frames = pipe.config.clip_frames + stream.radius + stream.context
    marks, frames, nfe = [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for clip in pipe.stream(image, (speech[i:i + step] for i in range(0, len(speech), step)),
                                generator=torch.Generator().manual_seed(0)):
            marks.append(time.perf_counter() - start)
            frames.append(len(clip.frames))
            nfe.append(clip.nfe)
    steady = sum(frames[1:]) / (marks[-1] - marks[0])
    return {"wait": wait_frames / FPS, "first": marks[0], "ttff": wait_frames / FPS + marks[0], "fps": steady,
            "nfe": nfe[0], "clip_frames": pipe.config.clip_frames}


def sd15_window_flops(frames: int, motion: int) -> dict[str, float]:
    """FLOPs of one clip window's parts at sd15: the bank of 1 and of 3 conditions, one denoising pass
    (with and without CFG tokens and layers), and the VAE decoding its frames."""
    counts = {}
    for cfg in ("none", "layer_tokens"):
        net = meta_denoiser("sd15", cfg)
        z, t, cond = example_inputs(net, 1, frames, motion)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                bank = net.encode_reference(cond)
            counts[f"bank1:{cfg}"] = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                net.encode_reference(cfg_conditions(cond))
            counts[f"bank3:{cfg}"] = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                net(z, t, cond, reference=bank)
            counts[f"pass:{cfg}"] = counter.get_total_flops()
    with torch.device("meta"):
        vae = VAECodec(config=SD15_VAE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.zeros(frames, 4, 64, 64, device="meta"))
    counts["decode"] = counter.get_total_flops()
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="speech streamed per model")
    p.add_argument("--chunk-ms", type=float, default=200.0)
    p.add_argument("--sd15-frames", type=int, default=16, help="clip frames of a sd15 window")
    p.add_argument("--tflops", type=float, default=312.0, help="the GPU's dense bf16 peak (A100: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="the share of it sampling reaches")
    args = p.parse_args(argv)

    print(f"micro on this CPU ({torch.get_num_threads()} threads), {args.seconds:g} s of speech in "
          f"{args.chunk_ms:g} ms chunks; live needs {FPS} fps")
    print(f"{'model':<40} {'NFE':>4} {'speech wait s':>13} {'1st window s':>12} {'TTFF s':>7} {'fps':>6} {'x live':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in micro_models(Path(tmp)):
            r = time_stream(pipeline_of(module.eval()), args.seconds, args.chunk_ms)
            rows.append((name, r))
            print(f"{name:<40} {r['nfe']:>4g} {r['wait']:>13.2f} {r['first']:>12.2f} {r['ttff']:>7.2f} "
                  f"{r['fps']:>6.1f} {r['fps'] / FPS:>7.2f}")

    flops = sd15_window_flops(args.sd15_frames, motion=2)
    rate = args.tflops * 1e12 * args.mfu
    context = 25  # wav2vec2's context_frames (datamodules/audio_features.py)
    print(f"\nsd15 on one GPU from the cost model: {args.sd15_frames}-frame windows at {args.tflops:g} TFLOPS x "
          f"MFU {args.mfu:g}; the first window waits for {args.sd15_frames} + 2 + {context} frames of speech")
    print(f"{'model':<40} {'NFE':>4} {'TFLOP/window':>12} {'window s':>9} {'TTFF s':>7} {'fps':>6} {'x live':>7}")
    for name, r in rows:
        cfg = "layer_tokens" if name.startswith("FADA-Fast") else "none"
        passes = 3 if name.startswith("Teacher") else 1
        steps = r["nfe"] / passes
        total = (flops[f"bank{passes}:{cfg}"] + steps * passes * flops[f"pass:{cfg}"] + flops["decode"])
        seconds = total / rate
        fps = args.sd15_frames / seconds
        ttff = (args.sd15_frames + 2 + context) / FPS + seconds
        print(f"{name:<40} {r['nfe']:>4g} {total / 1e12:>12.1f} {seconds:>9.3f} {ttff:>7.2f} {fps:>6.1f} "
              f"{fps / FPS:>7.2f}")
    print(f"\n(sd15 parts, TFLOP: bank of 1 {flops['bank1:none'] / 1e12:.2f}, of 3 {flops['bank3:none'] / 1e12:.2f}; "
          f"a denoising pass {flops['pass:none'] / 1e12:.2f} ({flops['pass:layer_tokens'] / 1e12:.2f} with CFG "
          f"tokens); VAE decode of {args.sd15_frames} frames {flops['decode'] / 1e12:.2f})")


if __name__ == "__main__":
    main()
