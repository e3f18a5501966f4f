"""`fada evaluate`: FID, FVD, Sync-D / Sync-C, E-FID, IQA and NFE-D of a teacher or student checkpoint
on held-out clips, as JSON beside the run and in its TensorBoard, with what the numbers depend on.

    fada evaluate --ckpt runs/perflow/tb/run/checkpoints/last.ckpt               # synthetic world
    fada evaluate --ckpt CKPT --config eval/real.yaml --data.shards /data/hdtf_test     # real extractors
    fada evaluate --ckpt CKPT --ref_scale 2.0 --audio_scale 6.5 --tag s2.0-a6.5           # other CFG scales

Each clip is generated from its reference frame (the clip's last frame) and its audio, `frames` frames
long, and compared with the real frames: FID over frames, FVD over clips, E-FID over per-frame
expression parameters; Sync-D / Sync-C of the generated frames against the clip's own audio; IQA of
the generated frames (no reference); NFE-D = denoising-network calls per clip window, counted.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoints import read_metadata
from .metrics.frechet import frechet_from_features
from .metrics.extractors import to_uint8
from .presets import find_config
from .sample import load_module
from .video_io import write_atomic, write_mp4

COLUMNS = ("NFE-D", "IQA", "Sync-D", "Sync-C", "FVD", "FID", "E-FID")  # FADA's tables' order, plus Sync-C
LOWER_IS_BETTER = {"NFE-D": True, "IQA": False, "Sync-D": True, "Sync-C": False, "FVD": True, "FID": True,
                   "E-FID": True}


class VideoEvaluator(nn.Module):
    """Collects features of generated and real clips (`update`), then computes every metric (`compute`).
    Each extractor is a module from config (metrics/extractors.py lists the roles)."""

    def __init__(self, frame_features: nn.Module, video_features: nn.Module, expression: nn.Module,
                 quality: nn.Module, sync: nn.Module):
        super().__init__()
        self.frame_features, self.video_features, self.expression = frame_features, video_features, expression
        self.quality, self.sync = quality, sync
        self.reset()

    def reset(self) -> None:
        self.collected: dict[str, list] = {}

    def _add(self, name: str, value) -> None:
        self.collected.setdefault(name, []).append(value.float().cpu() if torch.is_tensor(value) else value)

    @torch.no_grad()
    def update(self, fake: torch.Tensor, real: torch.Tensor, wav: torch.Tensor) -> None:
        """fake, real (B, T, 3, H, W) in [-1, 1]; wav (B, T * 640) the clips' audio at 16 kHz."""
        for which, video in (("fake", fake), ("real", real)):
            video = to_uint8(video).float().div(127.5).sub(1)  # scored as written to a video file
            self._add(f"frames_{which}", self.frame_features(video))
            self._add(f"video_{which}", self.video_features(video))
            self._add(f"expression_{which}", self.expression(video))
            self._add(f"quality_{which}", self.quality(video).unflatten(0, video.shape[:2]).mean(1))  # per clip
            self.collected.setdefault(f"sync_{which}", []).extend(self.sync(video, wav))

    def compute(self) -> dict:
        """-> {"IQA", "IQA_ci95", "Sync-D", "Sync-C", "FVD", "FID", "E-FID", "ground_truth": {...}, "per_clip": [...]}"""
        c = {k: torch.cat(v) if torch.is_tensor(v[0]) else v for k, v in self.collected.items()}
        if len(c["video_fake"]) < 2:
            raise ValueError("need at least 2 clips for Frechet distances")

        def clip_scores(which):
            quality, sync = c[f"quality_{which}"], c[f"sync_{which}"]
            return {"IQA": float(quality.mean()), "IQA_ci95": float(1.96 * quality.std() / math.sqrt(len(quality))),
                    "Sync-D": float(np.mean([s["sync_d"] for s in sync])),
                    "Sync-C": float(np.mean([s["sync_c"] for s in sync]))}

        per_clip = [{"IQA": round(float(q), 4), **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}}
                    for q, s in zip(c["quality_fake"], c["sync_fake"])]
        return {**clip_scores("fake"),
                "FVD": frechet_from_features(c["video_fake"], c["video_real"]),
                "FID": frechet_from_features(c["frames_fake"], c["frames_real"]),
                "E-FID": frechet_from_features(c["expression_fake"], c["expression_real"]),
                "ground_truth": clip_scores("real"), "per_clip": per_clip}

    def describe(self) -> dict:
        return {role: getattr(getattr(self, role), "describe", type(getattr(self, role)).__name__)
                for role in ("frame_features", "video_features", "expression", "quality", "sync")}


def eval_clips(module, clips: int, frames: int, shards: str | list[str] | None, synthetic: dict | None):
    """The first `clips` usable clips of `shards` (or of the synthetic world's test split, seed + 2000,
    written on first use), each decoded from frame 0 for `frames` frames with its wav, at the model's size."""
    from datamodules.clips import ClipDecoder, FixedClips
    from datamodules.shards import check_local_shards, resolve_shards
    from datamodules.synthetic import ensure_dataset

    size = module.preset["frame_size"]
    if not shards:
        if not synthetic:
            raise ValueError("give data.shards (held-out WebDataset shards) or data.synthetic")
        spec = dict(synthetic)
        root = Path(spec.pop("root", "data/synthetic")) / "test"
        # at least 100 clips, so evaluations of up to 100 clips (a --quick one, a full one) share one split
        count = max(clips, 100)
        ensure_dataset(root, seed=spec.pop("seed", 0) + 2000, strict_clips=count, lenient_clips=0,
                       clips_per_shard=min(count, 64), size=size, frames=max(frames, spec.pop("frames", 50)),
                       progress=False)
        shards = str(root / "strict")
    urls = resolve_shards(shards)
    check_local_shards(urls, "data.shards")
    decoder = ClipDecoder(module.audio_features, clip_frames=frames, motion_frames=0,
                          audio_radius=module.preset["net"]["audio"]["window"] // 2, frame_size=size, with_wav=True)
    return FixedClips(urls, decoder, clips), urls


def run_dir(ckpt: Path) -> Path:
    """The TensorBoard version folder a `fada fit` checkpoint sits in (…/tb/<version>/checkpoints/x.ckpt)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def evaluate(ckpt: str, evaluator: VideoEvaluator, clips: int = 100, frames: int = 24, batch_size: int = 10,
             data: dict | None = None, steps: int | None = None, ref_scale: float | None = None,
             audio_scale: float | None = None, eta: float | None = None, seed: int = 0, videos: int = 4,
             tag: str | None = None, out: str | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate the model in `ckpt` on `clips` held-out clips of `frames` frames.

    data: {"shards": held-out shards} or {"synthetic": {"root", "seed"}} (the world's test split).
    steps / ref_scale / audio_scale / eta: the sampler's, default the model's own.
    out: the JSON file (default <run>/eval/<ckpt name>[-tag].json); `videos` sample clips go beside it
    as mp4 and lossless PNG, and to TensorBoard (truth above sample), with every metric as eval/<name>
    at the ckpt's step.
    """
    began = time.perf_counter()
    ckpt_path = Path(ckpt)
    module = load_module(ckpt_path, map_location=device).eval()
    scales = module.sampling_scales(ref_scale, audio_scale)  # a one-pass student refuses scales before any work
    data = data or {"synthetic": {"root": "data/synthetic"}}
    dataset, urls = eval_clips(module, clips, frames, data.get("shards"), data.get("synthetic"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    evaluator = evaluator.to(device).eval()
    evaluator.reset()
    name = ckpt_path.stem + (f"-{tag}" if tag else "")
    out_path = Path(out) if out else run_dir(ckpt_path) / "eval" / f"{name}.json"
    nfe, keys, samples, seconds_sampling = [], [], [], 0.0
    for index, batch in enumerate(tqdm(loader, desc=f"evaluating {name}", unit="batch", disable=not progress)):
        g = torch.Generator(device=device).manual_seed(seed * 100003 + index)  # the same noise for every model
        start = time.perf_counter()
        fake, calls = module.generate(batch["ref"].to(device), batch["audio"].to(device), steps, ref_scale,
                                      audio_scale, generator=g, eta=eta)
        seconds_sampling += time.perf_counter() - start
        nfe.append(calls)
        keys += batch["key"]
        evaluator.update(fake, batch["frames"].to(device), batch["wav"].to(device))
        samples += [(batch["key"][i], batch["frames"][i], fake[i].cpu(), batch["wav"][i])
                    for i in range(len(fake)) if len(samples) + i < videos]
    metrics = evaluator.compute()
    if len(set(nfe)) != 1:
        raise RuntimeError(f"NFE per clip window varied between batches: {nfe}")
    checkpoint = read_metadata(ckpt_path)
    result = {
        "checkpoint": str(ckpt_path), "step": int(checkpoint.get("global_step", 0)), "model": type(module).__name__,
        "metrics": {"NFE-D": nfe[0], **{k: v for k, v in metrics.items() if k not in ("ground_truth", "per_clip")}},
        "ground_truth": metrics["ground_truth"],
        "depends_on": {
            "clips": len(dataset), "frames_per_clip": frames, "resolution": module.preset["frame_size"],
            "crop": "whole frame (clips are face crops already)", "data": urls if data.get("shards") else
            {"synthetic_test_split": data["synthetic"], "shards": urls},
            "reference": "the clip's last frame", "sampler": {
                "scheduler": type(module.scheduler()).__name__, "steps": steps or module.hparams.sample_steps,
                "ref_scale": scales[0], "audio_scale": scales[1], "eta": eta, "seed": seed},
            "extractors": evaluator.describe()},
        "seconds": {"total": round(time.perf_counter() - began, 1), "sampling": round(seconds_sampling, 1)},
        "per_clip": [{"key": key, **scores} for key, scores in zip(keys, metrics["per_clip"])],
        "json": str(out_path),
    }
    write_atomic(out_path, json.dumps(result, indent=1).encode())
    _log(out_path, ckpt_path, result, samples)
    return result


def _log(out_path: Path, ckpt_path: Path, result: dict, samples: list) -> None:
    """Metrics as eval/<name> scalars in the run's TensorBoard, sample clips there and beside the JSON as mp4
    (with sound, lossy) and as <tag>-<key>.png (lossless, native size: real frames above generated ones)."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    tag = out_path.stem
    writer = SummaryWriter(log_dir=str(run_dir(ckpt_path)))
    prefix = "eval" if tag == ckpt_path.stem else f"eval/{tag.removeprefix(ckpt_path.stem + '-')}"
    for key, value in result["metrics"].items():
        writer.add_scalar(f"{prefix}/{key}", value, result["step"])
    for i, (key, real, fake, wav) in enumerate(samples):
        strip = torch.cat(list(torch.cat([real, fake], dim=-2)), dim=-1)  # (3, 2H, T W): truth above sample
        writer.add_image(f"{prefix}/truth_over_sample/{i}", (strip.clamp(-1, 1) + 1) / 2, result["step"])
        png = io.BytesIO()
        Image.fromarray(to_uint8(strip).permute(1, 2, 0).numpy()).save(png, format="PNG")  # (2H, T W, 3) uint8
        write_atomic(out_path.parent / f"{tag}-{key}.png", png.getvalue())
        frames = to_uint8(fake).permute(0, 2, 3, 1).numpy()
        write_mp4(out_path.parent / f"{tag}-{key}.mp4", frames, wav.numpy())
    writer.close()


def format_metrics(result: dict) -> str:
    m, gt = result["metrics"], result["ground_truth"]
    cols = "  ".join(f"{k} {m[k]:.4g}" for k in COLUMNS if k in m)
    return (f"{cols}  (IQA +-{m['IQA_ci95']:.2g}; ground truth: IQA {gt['IQA']:.4g}, Sync-D {gt['Sync-D']:.4g}, "
            f"Sync-C {gt['Sync-C']:.4g}; {result['depends_on']['clips']} clips x {result['depends_on']['frames_per_clip']} "
            f"frames at {result['depends_on']['resolution']} px)")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="fada evaluate", description=__doc__.split("\n\n")[0],
                       default_config_files=[str(find_config("eval/synthetic.yaml"))])
    p.add_argument("--config", action=ActionConfigFile, help="an evaluation config (bundled: eval/synthetic.yaml, "
                   "eval/real.yaml)")
    p.add_function_arguments(evaluate, skip={"progress"})
    return p


def run(args: list[str], progress: bool = True) -> dict:
    """`fada evaluate`'s arguments (a bundled `--config` found by name) -> `evaluate`'s result."""
    args = [str(find_config(a)) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]
    p = parser()
    init = p.instantiate_classes(p.parse_args(args))
    return evaluate(**{k: v for k, v in init.items() if k != "config"}, progress=progress)


def main(argv: list[str] | None = None) -> dict:
    try:
        result = run(list(argv or []))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"fada evaluate: {err}") from None
    print(f"{result['checkpoint']}: {format_metrics(result)}")
    print(f"wrote {result['json']} (and sample clips beside it; TensorBoard: eval/* in "
          f"{run_dir(Path(result['checkpoint']))})")
    return result
