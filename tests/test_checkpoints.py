"""read_checkpoint on the layouts a sharded run can leave (the FSDP2 folder of a real two-process run
is read in tests/test_distributed.py)."""
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fada_lightning.checkpoints import read_checkpoint, read_metadata


def test_an_fsdp1_sharded_folder_reads_its_weights_and_metadata_but_not_its_optimizer(tmp_path):
    """FSDPStrategy's sharded layout keeps the weights under "model" and the optimizer as "optimizer_0"."""
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": {"net.w": torch.arange(4.0)}, "optimizer_0": {"state": {"m": torch.ones(4)}}},
             checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 7, "hyper_parameters": {"lr": 1e-4}}, folder / "meta.pt")
    checkpoint = read_checkpoint(folder)
    assert set(checkpoint) == {"state_dict", "global_step", "hyper_parameters"}
    torch.testing.assert_close(checkpoint["state_dict"]["net.w"], torch.arange(4.0))
    assert read_metadata(folder)["global_step"] == 7


def test_a_folder_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"runs is a folder but not a sharded checkpoint"):
        read_checkpoint(tmp_path / "runs")
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_the_random_states_a_checkpoint_keeps_set_every_generator_back_after_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from fada_lightning.module import rng_states, set_rng_states

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.save({"rng_states": rng_states()}, tmp_path / "c.ckpt")
    expected = torch.rand(3), random.random(), np.random.rand(), np.random.randn()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    set_rng_states(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng_states"])
    drawn = torch.rand(3), random.random(), np.random.rand(), np.random.randn()
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]


@pytest.mark.parametrize("rank, saved_on", [(1, 1), (0, 2), (1, 2)])
def test_a_resumed_rank_takes_its_saved_random_state_or_a_new_one_from_seed_rank_and_step(rank, saved_on, monkeypatch):
    """Two processes resume a checkpoint saved on `saved_on` processes: a rank with a saved state goes on
    from it; one without (rank 1 of a one-process save) reseeds from (seed, rank, step) and the run warns."""
    from types import SimpleNamespace

    from fada_lightning.module import TeacherModule, rank_seed, rng_states, seed_all

    states = []
    for r in range(saved_on):
        torch.manual_seed(100 + r)
        states.append(rng_states())
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    module = TeacherModule(ema_decay=None)
    module.on_load_checkpoint({"rng_states": states[0], **({"rng_states_by_rank": states} if saved_on > 1 else {})})
    module._trainer = SimpleNamespace(ckpt_path="last.ckpt", global_rank=rank, world_size=2, global_step=40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.on_train_start()
    drawn = torch.rand(4)
    seed_all(rank_seed(7, rank, 40) if rank >= saved_on else 100 + rank)
    assert torch.equal(drawn, torch.rand(4))
    assert any("kept random states for 1 process(es), this run has 2" in str(w.message) for w in caught) == (saved_on == 1)
