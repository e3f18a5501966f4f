"""The FSDP1 preset's wrapping plan (FSDP1 itself needs an accelerator; tests/test_distributed.py runs
DDP and FSDP2 on two CPU processes)."""
import pytest
import torch
from torch import nn

from fada_lightning.models.cfg import CFG_CONDITIONING
from fada_lightning.models.denoiser import AvatarDenoiser
from fada_lightning.presets import load_preset
from fada_lightning.strategies import _fsdp1_units


@pytest.mark.parametrize("cfg_conditioning", CFG_CONDITIONING)
def test_fsdp1_units_hold_every_weight_once_and_include_every_block(cfg_conditioning):
    """Every weight sits in exactly one unit (so every gradient is reduced once), and the blocks are
    units of their own (so a block's weights are gathered only while it runs)."""
    with torch.device("meta"):
        net = AvatarDenoiser(**{**load_preset("micro")["net"], "cfg_conditioning": cfg_conditioning})
    units = [getattr(parent, name) for parent, name in _fsdp1_units(net)]
    held = [id(p) for unit in units for p in unit.parameters()]
    assert sorted(held) == sorted(id(p) for p in net.parameters())
    assert {id(b) for b in net.sharding_units()} <= {id(u) for u in units}
    assert not any(u is net or isinstance(u, type(net.denoising_net)) for u in units)  # never a whole UNet


def test_fsdp1_refuses_weights_it_could_not_gather():
    """A module holding a weight beside its blocks would be used outside any unit's forward."""

    class Loose(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(1))

        def sharding_units(self):
            return [self.block]

    with pytest.raises(ValueError, match="Loose holds weights beside its blocks"):
        _fsdp1_units(Loose())
