"""DDP, FSDP2 and bf16-mixed on CPU: two `fada fit` processes talking over gloo against one process.

The runs use tests/dist_helpers.py (same clips and same random draws a step whatever the number of
processes) and a distiller that trains a network of its own every 2nd step besides the student
(tests/test_distiller_networks.py), so one process with batch 4 and two with batch 2 must agree:
per-step losses of both networks to 1e-5 relative and the weights after 3 steps to 1e-4 (float summation order differs: DDP averages
gradients in buckets, FSDP2 reduce-scatters them). FSDP1 needs an accelerator (torch >= 2.11), so
Lightning's `fsdp` preset is checked here only as far as its wrapping plan (tests/test_strategies.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from fada_lightning.checkpoints import CheckpointError, read_checkpoint
from fada_lightning.distill import read_teacher_checkpoint, teacher_weights
from fada_lightning.presets import find_config
from fada_lightning.sample import load_module

HERE = Path(__file__).parent
FADA = str(Path(sys.executable).parent / "fada")
STEPS = 3

pytestmark = pytest.mark.slow


PROBED = {"class_path": "test_distiller_networks.ProbedPeRFlow", "init_args": {"solver_steps": 2}}
DMD = {"class_path": "distillers.dmd.DMD",  # F every step, G every 2nd, with the GAN head on F
       "init_args": {"two_time_scale": 2, "fake_lr": 1e-3, "gan_gen_weight": 1e-3}}


def fit(tmp_path: Path, name: str, teacher_ckpt: str, shards: list[str], *args: str, devices: int = 1,
        batch_size: int = 4, data: dict | None = None, model: str = "dist_helpers.SeededDistill",
        distiller: dict = PROBED) -> dict:
    """`fada fit` of `model` with `distiller` for STEPS steps on `devices` CPU processes -> record.json
    (+ "dir")."""
    out = tmp_path / name
    config = {
        "seed_everything": 0,
        "trainer": dict(accelerator="cpu", devices=devices, max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                        callbacks=[{"class_path": "dist_helpers.Record", "init_args": {"out": str(out)}},
                                   {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"dirpath": str(out / "checkpoints"), "save_last": True}}]),
        "model": {"class_path": model, "init_args": {
            "teacher_ckpt": teacher_ckpt, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9,
            "distiller": distiller}},
        "data": data or {"class_path": "dist_helpers.IndexedClips",
                         "init_args": {"shards": shards[0].rsplit("/", 1)[0], "batch_size": batch_size}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([FADA, "fit", "--config", str(path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {**json.loads((out / "record.json").read_text()), "dir": out}


def shard_keys(url: str) -> set[str]:
    with tarfile.open(url) as tar:
        return {name.split(".", 1)[0] for name in tar.getnames()}


def weights(run: dict, when: str = "weights") -> dict[str, torch.Tensor]:
    """The module's whole state at the end of the run ("weights") or at its start ("start")."""
    return torch.load(run["dir"] / f"{when}.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_weights_but_noise(a: dict, b: dict, atol: float, noise_atol: float, noise_share: float):
    """Every element to `noise_atol`, and all but `noise_share` of all elements to `atol`: where a
    gradient is float noise, AdamW's normalised step may go either way (up to lr), but a wrong
    gradient moves many elements."""
    assert_same_weights(a, b, noise_atol)
    apart = sum(int(((a[k].float() - b[k].float()).abs() > atol).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert apart <= noise_share * total, f"{apart} of {total} elements differ by more than {atol}"


def two_processes(tmp_path, name, teacher_ckpt, shards, strategy, *args, **kwargs):
    return fit(tmp_path, name, teacher_ckpt, shards, "--config", str(find_config(f"strategies/{strategy}.yaml")),
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true",
               "--data.init_args.batch_size=2", *args, devices=2, **kwargs)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, teacher_ckpt, shards):
    return fit(tmp_path_factory.mktemp("one"), "one", teacher_ckpt, shards)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, teacher_ckpt, shards):
    return two_processes(tmp_path_factory.mktemp("fsdp2"), "fsdp2", teacher_ckpt, shards, "fsdp2")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, teacher_ckpt, shards):
    return two_processes(tmp_path_factory.mktemp("ddp"), "ddp", teacher_ckpt, shards, "ddp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_follow_one_process_with_the_same_global_batch(strategy, one_process, teacher_ckpt, request):
    """Losses to 1e-5 relative; weights (student and EMA) to 1e-4 absolute, a tenth of one AdamW step at
    lr 1e-3 (Adam's normalisation turns float noise in near-zero gradients into update noise)."""
    run = request.getfixturevalue(f"{strategy}_run")
    assert run["world_size"] == 2 and len(run["losses"]) == len(one_process["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one_process["losses"]), rtol=1e-5, atol=1e-8)
    assert len(one_process["network_losses"]["probe"]) == 2  # steps 0 and 2 of 3
    assert run["network_losses"].keys() == one_process["network_losses"].keys() == {"student", "probe"}
    for name, losses in one_process["network_losses"].items():
        torch.testing.assert_close(torch.tensor(run["network_losses"][name]), torch.tensor(losses), rtol=1e-5, atol=1e-8)
    mine, theirs = weights(run), weights(one_process)
    assert_same_weights(mine, theirs, atol=1e-4)
    start = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    moved = max((theirs[f"net.{k[len('ema.module.'):]}"] - v).abs().max().item()
                for k, v in start.items() if k.startswith("ema.module."))
    assert moved > 2e-3  # the runs trained: the tolerance is far below how far the weights moved
    # each network its own FSDP root (the distiller's probe too), none wrapped with another
    assert run["sharded"] == {name: strategy == "fsdp2" for name in ("net", "ema", "teacher", "distiller.probe")}
    keys = run["keys"]  # each rank saw its own clips (clip i on rank i mod 2), as many batches each
    assert len(keys[0]) == len(keys[1]) == STEPS
    assert {k for step in keys[0] for k in step}.isdisjoint({k for step in keys[1] for k in step})


def test_ranks_draw_apart_and_a_resumed_run_goes_on_with_each_rank_s_own_draws(teacher_ckpt, shards, tmp_path):
    """`seed_everything` gives both processes one random state; rank 1 reseeds from (seed, rank), so the
    ranks draw different t, noise and dropout for their clips. 3 steps on two processes, then resumed to 5,
    equals 5 straight: each rank's random state at each step (the checkpoint keeps every rank's) and
    the weights. (The real DistillModule, drawing from the global generators; one batch a rank a step.)"""
    def run(name, *args):
        return two_processes(tmp_path, name, teacher_ckpt, shards, "ddp", "--data.init_args.count=4", *args,
                             model="fada_lightning.distill.DistillModule")

    straight = run("straight", f"--trainer.max_steps={STEPS + 2}")
    first = run("first")
    resumed = run("resumed", f"--trainer.max_steps={STEPS + 2}", f"--ckpt_path={first['dir'] / 'checkpoints' / 'last.ckpt'}")
    rank0, rank1 = straight["rng"]
    assert len(rank0) == STEPS + 2 and all(a != b for a, b in zip(rank0, rank1))
    assert first["rng"] == [states[:STEPS] for states in straight["rng"]]
    assert resumed["rng"] == [states[STEPS:] for states in straight["rng"]]
    assert_same_weights(weights(resumed), weights(straight), atol=0)


DMD_SPECS = {"ddp": {"class_path": DMD["class_path"], "init_args": {**DMD["init_args"], "gan_gen_weight": 0.0}},
             "fsdp2": DMD}  # the GAN head where G's backward crosses F's sharded root through a hook


@pytest.fixture(scope="module")
def dmd_one_process(tmp_path_factory, teacher_ckpt, shards):
    """One process of each DMD spec, by the strategy its two-process run uses."""
    return {strategy: fit(tmp_path_factory.mktemp("dmd_one"), f"dmd_one_{strategy}", teacher_ckpt, shards, distiller=spec)
            for strategy, spec in DMD_SPECS.items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dmd_on_two_processes_follows_one_process(strategy, dmd_one_process, teacher_ckpt, shards, tmp_path):
    """DMD's three networks (G, the frozen R, F; with its GAN head under DDP) and two optimizers: every draw of a
    step lives in its job, so P processes with per-clip draws make one process's steps. Each rank may
    draw another generator step k: the ranks run the largest k's passes in step (FSDP2 would hang else).
    G's loss, 0.5 mean grad^2 with grad a difference of two near-equal scores (F starts as R), carries
    float summation noise ~100x relative: to 1e-3; F's loss as for every distiller."""
    run = two_processes(tmp_path, f"dmd_{strategy}", teacher_ckpt, shards, strategy, distiller=DMD_SPECS[strategy])
    one = dmd_one_process[strategy]["network_losses"]
    assert run["network_losses"].keys() == one.keys() == {"student", "fake_score"}
    assert len(one["student"]) == 2 and len(one["fake_score"]) == 3  # G at steps 0 and 2, F every step
    torch.testing.assert_close(torch.tensor(run["network_losses"]["student"]), torch.tensor(one["student"]), rtol=1e-3,
                               atol=0)
    torch.testing.assert_close(torch.tensor(run["network_losses"]["fake_score"]), torch.tensor(one["fake_score"]),
                               rtol=1e-5, atol=1e-8)
    mine, theirs = weights(run), weights(dmd_one_process[strategy])
    fake = {k for k in theirs if k.startswith("distiller.networks.fake_score.")}
    # G's (and the EMA's) elements whose gradient is near zero in that noise may move by up to an
    # AdamW step (lr 1e-3) either way (one element by 1.3e-4 on CI's machine): all to one step, and
    # all but 1 in 10^4 of the state's elements (the frozen teacher's among them) to 1e-4, the other
    # distillers' bound
    assert_same_weights_but_noise({k: v for k, v in mine.items() if k not in fake},
                                  {k: v for k, v in theirs.items() if k not in fake}, atol=1e-4, noise_atol=1e-3,
                                  noise_share=1e-4)
    # F's samples come from G, so F's elements carry the same noise: to one step
    assert_same_weights({k: mine[k] for k in fake}, {k: theirs[k] for k in fake}, atol=1e-3)
    assert run["sharded"] == {name: strategy == "fsdp2" for name in ("net", "ema", "teacher", "distiller.fake_score")}


def test_dmd_resumes_both_optimizers_and_the_two_time_scale_phase(teacher_ckpt, shards, tmp_path):
    """3 steps, then resumed to 5 (F at 3 and 4, G at 4 only), equals 5 steps straight: the weights,
    both AdamW states and warm-ups restored, the phase read off the global step. (One batch of 2 clips
    every step, with new draws each step: where Lightning restarts a map-style epoch on resuming does
    not matter.)"""
    data = ("--data.init_args.count=2", "--data.init_args.batch_size=2")
    first = fit(tmp_path, "first", teacher_ckpt, shards, *data, distiller=DMD)
    straight = fit(tmp_path, "straight", teacher_ckpt, shards, *data, f"--trainer.max_steps={STEPS + 2}", distiller=DMD)
    resumed = fit(tmp_path, "resumed", teacher_ckpt, shards, *data, f"--trainer.max_steps={STEPS + 2}",
                  f"--ckpt_path={first['dir'] / 'checkpoints' / 'last.ckpt'}", distiller=DMD)
    assert first["network_losses"] == {name: losses[:len(first["network_losses"][name])]
                                       for name, losses in straight["network_losses"].items()}
    assert resumed["network_losses"]["student"] == straight["network_losses"]["student"][-1:]
    assert resumed["network_losses"]["fake_score"] == straight["network_losses"]["fake_score"][-2:]
    assert_same_weights(weights(resumed), weights(straight), atol=0)


ADVERSARIAL = {"class_path": "distillers.adversarial.Adversarial",  # G and D every step, D on the frozen teacher
               "init_args": {"d_lr": 1e-3, "real_weight": 0.5,
                             "step_schedule": {"class_path": "distillers.adversarial.Progressive",
                                               "init_args": {"ramp_steps": 2}}}}
ADVERSARIAL_SPECS = {"fsdp2": ADVERSARIAL,  # D's own trainable backbone and the DMD term (F trains too) under DDP
                     "ddp": {"class_path": ADVERSARIAL["class_path"],
                             "init_args": {**ADVERSARIAL["init_args"], "backbone": "trainable", "dmd_weight": 0.5,
                                           "fake_lr": 1e-3}}}


@pytest.fixture(scope="module")
def adversarial_one_process(tmp_path_factory, teacher_ckpt, shards):
    return {strategy: fit(tmp_path_factory.mktemp("adversarial_one"), f"adversarial_one_{strategy}", teacher_ckpt,
                          shards, distiller=spec) for strategy, spec in ADVERSARIAL_SPECS.items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_adversarial_on_two_processes_follows_one_process(strategy, adversarial_one_process, teacher_ckpt, shards,
                                                          tmp_path):
    """G, its frozen reference G4 (sharded like the teacher), D's heads on the decoder blocks of the frozen
    teacher (FSDP2) or of D's own backbone with the DMD term beside (DDP), real clips beside G4's: each
    clip's draws (its step, t-hat, noises) are in the job and D's loss is a mean over clips, so P
    processes make one process's steps. G's backward enters the backbone through the heads' hooks,
    not its output (strategies.FSDP2 keeps a root's own weights gathered for it)."""
    spec = ADVERSARIAL_SPECS[strategy]
    run = two_processes(tmp_path, f"adversarial_{strategy}", teacher_ckpt, shards, strategy, distiller=spec)
    one = adversarial_one_process[strategy]
    names = {"student", "discriminator"} | ({"fake_score"} if strategy == "ddp" else set())
    assert run["network_losses"].keys() == one["network_losses"].keys() == names
    for name, losses in one["network_losses"].items():
        rtol = 1e-3 if name == "student" and strategy == "ddp" else 1e-5  # the DMD term: see the DMD test
        torch.testing.assert_close(torch.tensor(run["network_losses"][name]), torch.tensor(losses), rtol=rtol, atol=1e-8)
    # with the DMD term (DDP), G's gradient and the samples F and D's backbone learn from carry its difference of
    # near-equal scores: elements with gradients near zero in float noise may move by an AdamW step (lr 1e-3)
    # either way, each step; without it, weights to 1e-4 as for every distiller
    assert_same_weights(weights(run), weights(one), atol=STEPS * 1e-3 if strategy == "ddp" else 1e-4)
    assert run["sharded"] == {name: strategy == "fsdp2" for name in
                              ("net", "ema", "teacher", *[f"distiller.{n}" for n in sorted(names - {"student"})],
                               "distiller.frozen.g4")}


def test_adversarial_resumes_g_d_their_optimizers_and_the_schedule(teacher_ckpt, shards, tmp_path):
    """3 steps, then resumed to 5, equals 5 steps straight, bit for bit: G, D, both AdamWs and the
    progressive schedule's step (in the checkpoint)."""
    data = ("--data.init_args.count=2", "--data.init_args.batch_size=2")
    first = fit(tmp_path, "first", teacher_ckpt, shards, *data, distiller=ADVERSARIAL)
    assert int(torch.load(first["dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
        "distiller.step_schedule.step"]) == STEPS - 1
    straight = fit(tmp_path, "straight", teacher_ckpt, shards, *data, f"--trainer.max_steps={STEPS + 2}",
                   distiller=ADVERSARIAL)
    resumed = fit(tmp_path, "resumed", teacher_ckpt, shards, *data, f"--trainer.max_steps={STEPS + 2}",
                  f"--ckpt_path={first['dir'] / 'checkpoints' / 'last.ckpt'}", distiller=ADVERSARIAL)
    for name, losses in straight["network_losses"].items():
        assert resumed["network_losses"][name] == losses[-2:], name
    assert_same_weights(weights(resumed, "start"), weights(first), atol=0)
    assert_same_weights(weights(resumed), weights(straight), atol=0)


def test_a_sharded_checkpoint_resumes_on_one_process(fsdp2_run, teacher_ckpt, shards, tmp_path):
    """The FSDP2 run's last.ckpt (a folder of 2 shards) loads into 1 process: the same weights, EMA and
    step, and training goes on from there."""
    last = fsdp2_run["dir"] / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]  # written aside, swapped in whole
    run = fit(tmp_path, "resumed", teacher_ckpt, shards, "--config", str(find_config("strategies/fsdp2.yaml")),
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
              f"--trainer.max_steps={STEPS + 1}", f"--ckpt_path={last}")
    assert run["world_size"] == 1 and run["global_step"] == STEPS + 1 and len(run["losses"]) == 1
    assert_same_weights(weights(run, "start"), weights(fsdp2_run), atol=0)


def test_a_sharded_checkpoint_reads_whole_for_sampling_and_keeps_its_role(fsdp2_run):
    """`fada sample`/`fada evaluate` (load_module) and a distiller's teacher_ckpt read the folder of shards
    in one process without a process group: the run's final weights, exactly. The folder's metadata
    records that it is a student's, so it is refused as a teacher."""
    last = fsdp2_run["dir"] / "checkpoints" / "last.ckpt"
    final = weights(fsdp2_run)
    assert any(k.startswith("distiller.networks.probe.") for k in final)  # trained, saved, and not for sampling:
    assert_same_weights(load_module(last).state_dict(),
                        {k: v for k, v in final.items() if not k.startswith("distiller.networks.")}, atol=0)
    with pytest.raises(CheckpointError, match="is a student checkpoint .*a teacher checkpoint is needed"):
        read_teacher_checkpoint(last)
    checkpoint = read_checkpoint(last)  # as read_teacher_checkpoint reads a teacher's folder
    assert checkpoint["global_step"] == STEPS and "preset" in checkpoint["hyper_parameters"]
    assert "optimizer_states" not in checkpoint  # left on disk: only resuming needs them
    ema = {k[len("ema.module."):]: v for k, v in final.items() if k.startswith("ema.module.")}
    assert_same_weights(teacher_weights(checkpoint, last), ema, atol=0)


def test_bf16_mixed_keeps_float32_weights(one_process, teacher_ckpt, shards, tmp_path):
    """bf16-mixed on CPU (autocast), sharded with weights gathered in bf16: float32 shards, losses near float32's."""
    run = two_processes(tmp_path, "bf16", teacher_ckpt, shards, "fsdp2", "--trainer.precision=bf16-mixed",
                        "--trainer.strategy.init_args.param_dtype=bfloat16")
    assert run["dtypes"] == ["torch.float32"]
    bf16, fp32 = torch.tensor(run["losses"]), torch.tensor(one_process["losses"])
    assert torch.isfinite(bf16).all() and not torch.equal(bf16, fp32)  # autocast did run in bf16
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0)


def test_the_streaming_data_gives_each_rank_its_own_shards_and_equal_batches_across_epochs(teacher_ckpt, shards,
                                                                                           tmp_path):
    """The WebDataset stream under DDP on 2 processes: rank r reads shard r only (2 shards, 1 worker
    each), and with 2 clips per rank an epoch, 5 steps cross two epoch ends without a hang."""
    data = {"class_path": "datamodules.streaming.AvatarDataModule", "init_args": {
        "train_shards": shards, "batch_size": 1, "num_workers": 1, "epoch_samples": 2}}
    run = fit(tmp_path, "stream", teacher_ckpt, shards, "--config", str(find_config("strategies/ddp.yaml")),
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true", "--trainer.max_steps=5",
              devices=2, data=data, model="fada_lightning.distill.DistillModule")
    assert run["world_size"] == 2 and run["global_step"] == 5
    keys = [[k for step in rank for k in step] for rank in run["keys"]]
    assert len(keys[0]) == len(keys[1]) == 5
    shard_of = {key: i for i, url in enumerate(shards) for key in shard_keys(url)}
    assert {shard_of[k] for k in keys[0]} == {0} and {shard_of[k] for k in keys[1]} == {1}
