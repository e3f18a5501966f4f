"""Sharded training for the avatar modules (configs/strategies/*.yaml).

    FSDP2   torch's `fully_shard` through Lightning's ModelParallelStrategy: CPU (gloo) and GPU (nccl)
    FSDP    Lightning's FSDPStrategy (FSDP1, FullyShardedDataParallel units): GPU only (torch 2.11's
            FSDP1 needs an accelerator; here its wrapping plan is tested, not a run)

Every network of the module (`module.networks()`: the student `net`, its EMA, a distiller's frozen
teacher and the networks a distiller trains of its own) is sharded on its own, block by block (`AvatarDenoiser.sharding_units`), so no FSDP unit
ever holds frozen and trainable weights together: the teacher's shards get no gradients and no
optimizer state, and the EMA's shards sit on the same ranks as the student's, so its update is a
local lerp of shard onto shard. FSDP2's checkpoints are folders of shards (torch.distributed.checkpoint),
which resume on the same or another number of processes; FSDP's are single files by default.
"""
from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import (FSDPModule, FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.fsdp.wrap import wrap

# AvatarDenoiser methods the samplers call besides forward: FSDP gathers the weights for them too
FORWARD_METHODS = ("encode_reference",)


class FSDP2(ModelParallelStrategy):
    """Fully sharded data parallel over every process of every node (FSDP2, `fully_shard`).

    param_dtype: the dtype weights are gathered and computed in, e.g. "bfloat16" (the shards, the
    gradients' reduction and the optimizer stay float32); None: the shards' own dtype, under the
    Trainer's precision (bf16-mixed autocasts).
    reshard_after_forward: free a block's gathered weights after its forward (ZeRO-3, least memory);
    False keeps them until backward (ZeRO-2-like, one all-gather less per block). A network's own
    weights outside its blocks stay gathered from forward to backward either way.
    """

    def __init__(self, param_dtype: str | None = None, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.param_dtype = getattr(torch, param_dtype) if param_dtype else None
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # one data-parallel group: all ranks
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A folder of shards is written whole beside its target (`.NAME.partial`), then swapped in by
        two renames on rank 0 (NAME -> `.NAME.old`, partial -> NAME), so a kill leaves the previous
        folder or the new one (checkpoints.recover_folder_swap finishes a swap a kill cut between its renames)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # what a killed save left
        self.barrier("fada_save_partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("fada_save_written")
        if self.global_rank == 0:
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("fada_save_swapped")

    def parallelize(self, module) -> None:
        """Shard each of `module.networks()` on the data-parallel mesh (LightningModule.configure_model)."""
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for net in module.networks().values():
            if is_sharded(net):
                continue  # sharded already (configure_model runs again for a second fit or test)
            for unit in sharding_units(net):
                fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
            # the root's own weights (conv in/out, embeddings: small) stay gathered from forward to backward,
            # FSDP2's default for a root (None): its pre-backward gather is hooked on its output, and a head
            # reading decoder features through a hook (a discriminator) backpropagates into conv_in past it
            fully_shard(net, mesh=mesh, reshard_after_forward=None if self.reshard_after_forward else False,
                        mp_policy=policy)
            for method in FORWARD_METHODS:
                if hasattr(net, method):
                    register_fsdp_forward_method(net, method)


class FSDP(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) with the units of `FSDP2`, for setups that keep to FSDP1.

    An FSDP1 unit gathers its weights only inside its own forward, and a wrapper cannot register other
    entry points (`encode_reference`). So each network is not wrapped as a whole: its units are its
    blocks plus the modules outside them that hold weights (conv in/out, time embeddings, the audio
    projection, CFG tokens), each used only through its forward. The arguments are FSDPStrategy's
    (sharding_strategy, state_dict_type, cpu_offload, ...); the mixed precision follows the Trainer's.
    """

    def parallelize(self, module) -> None:
        """Wrap each of `module.networks()` in place (LightningModule.configure_model, which Lightning
        runs inside this strategy's `enable_wrap`, so `wrap` applies its settings)."""
        for net in module.networks().values():
            if is_sharded(net):
                continue  # wrapped already (configure_model runs again for a second fit or test)
            for parent, name in _fsdp1_units(net):
                setattr(parent, name, wrap(getattr(parent, name)))


def sharding_units(net: nn.Module) -> list[nn.Module]:
    """The blocks of `net` sharded one at a time: its `sharding_units()` (AvatarDenoiser's UNet blocks),
    none for a network without them (a small head: one unit, the whole network)."""
    return net.sharding_units() if hasattr(net, "sharding_units") else []


def _fsdp1_units(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, child name) of every FSDP1 unit of `net`: its sharding units, and the largest modules
    outside them that hold weights and contain no unit."""
    blocks = sharding_units(net)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    blocks = {id(block) for block in blocks}
    units = []

    def visit(parent: nn.Module):
        if any(True for _ in parent.parameters(recurse=False)):
            raise ValueError(f"{type(parent).__name__} holds weights beside its blocks: FSDP1 cannot gather them "
                             "for it; use the FSDP2 strategy")
        for name, child in parent.named_children():
            if id(child) in blocks or not any(id(m) in in_blocks for m in child.modules()):
                if any(True for _ in child.parameters()):
                    units.append((parent, name))
            else:
                visit(child)

    visit(net)
    return units


def is_sharded(net: nn.Module) -> bool:
    """True once `parallelize` has sharded `net` (FSDP2) or wrapped its units (FSDP)."""
    return isinstance(net, FSDPModule) or any(isinstance(m, FullyShardedDataParallel) for m in net.modules())
