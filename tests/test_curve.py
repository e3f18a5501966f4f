"""`fada curve`: every kept checkpoint of a run evaluated once, plotted beside the run's held-out loss."""
import json
import shutil

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from fada_lightning import curve


def test_curve_evaluates_each_kept_checkpoint_once_and_plots_it(teacher_ckpt, tmp_path, capsys):
    run = tmp_path / "tb" / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (2, 4, 6):  # the same weights under three steps: the curve reads its step from the checkpoint
        checkpoint = torch.load(teacher_ckpt, weights_only=False)
        checkpoint["global_step"] = step
        torch.save(checkpoint, run / "checkpoints" / f"step{step:06d}.ckpt")
    shutil.copy(run / "checkpoints" / "step000006.ckpt", run / "checkpoints" / "last.ckpt")  # not a kept one
    with SummaryWriter(str(run)) as writer:
        for step, value in ((2, 0.3), (4, 0.2), (6, 0.15)):
            writer.add_scalar("val/loss", value, step)
    data = json.dumps({"synthetic": {"root": str(tmp_path / "data"), "strict_clips": 4, "lenient_clips": 0,
                                     "clips_per_shard": 4, "size": 32, "progress": False}})
    options = ["--clips", "3", "--frames", "8", "--batch_size", "3", "--steps", "2", "--data", data]

    curve.main([str(run), "--every", "4", *options])
    scored = sorted(p.name for p in (run / "eval" / "curve").glob("step*.json"))
    assert scored == ["step0000004.json"]  # --every 4: only step 4 of 2, 4, 6
    curve.main([str(run / "checkpoints"), *options])
    out = capsys.readouterr().out
    assert out.count("[curve] step 4:") == 1 and "[curve] step 2:" in out and "[curve] step 6:" in out  # 4 kept
    lines = (run / "eval" / "curve" / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("step,NFE-D,IQA,Sync-D") and [line.split(",")[0] for line in lines[1:]] == ["2", "4", "6"]
    assert (run / "eval" / "curve" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert curve.held_out_loss(run) == [(2, pytest.approx(0.3)), (4, pytest.approx(0.2)), (6, pytest.approx(0.15))]


def test_curve_names_a_run_without_kept_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="no step<N>.ckpt"):
        curve.main([str(tmp_path)])
