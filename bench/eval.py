"""Cost of the evaluation metrics: seconds to score 100 clips per metric on `micro` (32 px), the
sampling excluded (that is bench/sampling.py's), in one run.

    python bench/eval.py [--clips 100] [--frames 16] [--real]

Each metric's time covers its feature extraction for the generated and the real clips plus its own
arithmetic (the Frechet distance, SyncNet's offset search). The clips are the synthetic world's test
clips scored against themselves with a little noise as the "generated" side. --real adds the
paper-scale extractors with random weights (same cost as trained ones): Inception (frames resized to
299), torchvision's r3d_18 (112) and SyncNet (224), on the same 32 px clips.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datamodules.synthetic import render_clip
from fada_lightning.metrics import synthetic
from fada_lightning.metrics.frechet import frechet_from_features


def test_clips(count: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    rendered = [render_clip(2000, "strict", i, size=32, frames=frames) for i in range(count)]
    video = torch.stack([torch.from_numpy(v).permute(0, 3, 1, 2).float() / 127.5 - 1 for v, _, _ in rendered])
    return video, torch.stack([torch.from_numpy(w) for _, w, _ in rendered])


def timed(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def batched(extractor, video, batch: int = 10, *extra):
    outs = [extractor(video[i:i + batch], *(e[i:i + batch] for e in extra)) for i in range(0, len(video), batch)]
    return torch.cat(outs) if torch.is_tensor(outs[0]) else [o for out in outs for o in out]


def frechet_metric(extractor, fake, real):
    return frechet_from_features(batched(extractor, fake), batched(extractor, real))


def mean_metric(extractor, fake, real):
    return float(batched(extractor, fake).mean())


def sync_metric(extractor, fake, real, wav):
    scores = batched(extractor, fake, 10, wav)
    return sum(s["sync_d"] for s in scores) / len(scores)


def random_real_extractors(folder: Path) -> dict:
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchvision.models.video import r3d_18

    from fada_lightning.metrics.extractors import InceptionFrames, R3DVideo
    from fada_lightning.metrics.sync import SyncNet, SyncNetScorer

    saved_url, saved_load = tf_inception.load_state_dict_from_url, tf_inception.FeatureExtractorInceptionV3.load_state_dict
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}
    tf_inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.save(NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).state_dict(), folder / "inception.pth")
    finally:
        tf_inception.load_state_dict_from_url, tf_inception.FeatureExtractorInceptionV3.load_state_dict = saved_url, saved_load
    torch.save(r3d_18(weights=None).state_dict(), folder / "r3d.pth")
    torch.save(SyncNet().state_dict(), folder / "syncnet.model")
    return {"FID (Inception, 299 px)": (frechet_metric, InceptionFrames(str(folder / "inception.pth"))),
            "FVD (r3d_18, 112 px)": (frechet_metric, R3DVideo(str(folder / "r3d.pth"))),
            "Sync-D/C (SyncNet, 224 px)": (sync_metric, SyncNetScorer(str(folder / "syncnet.model")))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--real", action="store_true", help="also the paper-scale extractors (random weights)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    real, wav = test_clips(args.clips, args.frames)
    fake = (real + 4 / 127.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    _, load_seconds = timed(synthetic.world_net, 0, 32)
    rows = {"FID (WorldFrames)": (frechet_metric, synthetic.WorldFrames()),
            "FVD (WorldVideo)": (frechet_metric, synthetic.WorldVideo()),
            "E-FID (WorldExpression)": (frechet_metric, synthetic.WorldExpression()),
            "IQA (WorldQuality)": (mean_metric, synthetic.WorldQuality()),
            "Sync-D/C (WorldSync)": (sync_metric, synthetic.WorldSync())}
    with tempfile.TemporaryDirectory() as folder:
        if args.real:
            rows.update(random_real_extractors(Path(folder)))
        print(f"{args.clips} clips x {args.frames} frames at 32 px (generated and real sides); WorldNet ready in "
              f"{load_seconds:.1f} s (trained once per seed and size, then cached)")
        print(f"{'metric':32s} {'seconds':>8s} {'per clip':>9s}  value")
        for name, (metric, extractor) in rows.items():
            extra = (wav,) if metric is sync_metric else ()
            value, seconds = timed(metric, extractor, fake, real, *extra)
            print(f"{name:32s} {seconds:8.2f} {1000 * seconds / args.clips:7.1f}ms  {value:.4g}")


if __name__ == "__main__":
    main()
