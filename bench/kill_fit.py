"""Does a run survive being killed at any instant? `fada fit` of a tiny teacher that checkpoints
every step is SIGKILLed at random instants (during start-up, training and saves), with $TMPDIR on
another filesystem where there is one (/dev/shm), and resumed each time with `--ckpt_path last`.
After every kill: last.ckpt loads, its step never goes back, and no file is left in $TMPDIR. At the
end the run finishes at max_steps with no partial file left.

    python bench/kill_fit.py [--kills 10] [--steps 40] [--out runs/kill_fit]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from fada_lightning.presets import find_config


def tiny_config(out: Path, steps: int) -> Path:
    config = yaml.safe_load(find_config("teacher.yaml").read_text())
    config["trainer"].update(max_steps=steps, val_check_interval=steps, limit_val_batches=1, log_every_n_steps=1,
                             default_root_dir=str(out), enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(out), "name": "tb", "version": "run"}
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=steps, last_every_n_steps=1)
    config["model"]["init_args"].update(clip_frames=4, ema_decay=0.9)
    config["data"]["init_args"].update(batch_size=2, epoch_samples=8, val_samples=2, num_workers=2, synthetic=dict(
        root=str(out / "data"), strict_clips=8, lenient_clips=0, clips_per_shard=2, frames=12, size=32,
        progress=False))
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/kill_fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = tiny_config(out, args.steps)
    fada = str(Path(sys.executable).with_name("fada"))
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="kill_fit_", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    env = {**os.environ, "TMPDIR": str(tmp)}
    folder = out / "tb" / "run" / "checkpoints"
    last = folder / "last.ckpt"
    rng = np.random.default_rng(args.seed)
    command = [fada, "fit", "--config", str(config), "--ckpt_path", "last"]
    subprocess.run(command + ["--trainer.max_steps=1"], env=env, capture_output=True, check=True)  # data + a first checkpoint
    print(f"TMPDIR {tmp} ({'another filesystem' if tmp.stat().st_dev != out.stat().st_dev else 'same filesystem'})")
    print(f"{'kill':>4} {'after s':>8} {'step before':>12} {'step after':>11} {'partial':>9}  last.ckpt")
    survived, step = 0, torch.load(last, weights_only=True)["global_step"]
    for kill in range(1, args.kills + 1):
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = float(rng.uniform(8, 40))  # start-up takes ~10 s here: most kills land in training and saves
        time.sleep(delay)
        run.kill()
        run.wait()
        partial = any(p.name.endswith(".partial") for p in folder.iterdir())
        leaked = [f for f in tmp.rglob("*") if f.is_file()]  # (killed DataLoader workers leave empty pymp-* dirs)
        try:
            after = torch.load(last, weights_only=True)["global_step"]
            ok = after >= step and not leaked
            state = "whole" if ok else f"step went back, or files left in TMPDIR: {leaked[:3]}"
        except Exception as err:
            after, ok, state = -1, False, f"UNREADABLE: {type(err).__name__}"
        survived += ok
        print(f"{kill:>4} {delay:>8.1f} {step:>12} {after:>11} {'yes' if partial else 'no':>9}  {state}")
        step = max(step, after)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    final = torch.load(last, weights_only=True)["global_step"]
    left = sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))
    print(f"survived {survived} of {args.kills} kills; the resumed run finished at step {final} of {args.steps} "
          f"(exit {done.returncode}); partial files left: {left or 'none'}; files left in TMPDIR: "
          f"{len([f for f in tmp.rglob('*') if f.is_file()])}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
