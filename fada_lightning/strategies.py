"""Sharded training for the avatar modules (configs/strategies/*.yaml).

    FSDP2   torch's `fully_shard` through Lightning's ModelParallelStrategy: CPU (gloo) and GPU (nccl)

Every network of the module (`module.networks()`: the student `net`, its EMA, a distiller's frozen
teacher) is sharded on its own, block by block (`AvatarDenoiser.sharding_units`), so no FSDP unit
ever holds frozen and trainable weights together: the teacher's shards get no gradients and no
optimizer state, and the EMA's shards sit on the same ranks as the student's, so its update is a
local lerp of shard onto shard. Checkpoints are folders of shards (torch.distributed.checkpoint),
which resume on the same or another number of processes.
"""
from __future__ import annotations

from datetime import timedelta

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

# AvatarDenoiser methods the samplers call besides forward: FSDP gathers the weights for them too
FORWARD_METHODS = ("encode_reference",)


class FSDP2(ModelParallelStrategy):
    """Fully sharded data parallel over every process of every node (FSDP2, `fully_shard`).

    param_dtype: the dtype weights are gathered and computed in, e.g. "bfloat16" (the shards, the
    gradients' reduction and the optimizer stay float32); None: the shards' own dtype, under the
    Trainer's precision (bf16-mixed autocasts).
    reshard_after_forward: free a block's gathered weights after its forward (ZeRO-3, least memory);
    False keeps them until backward (ZeRO-2-like, one all-gather less per block).
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

    def parallelize(self, module) -> None:
        """Shard each of `module.networks()` on the data-parallel mesh (LightningModule.configure_model)."""
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for net in module.networks().values():
            if isinstance(net, FSDPModule):
                continue  # sharded already (configure_model runs again for a second fit or test)
            for unit in net.sharding_units():
                fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
            fully_shard(net, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
            for method in FORWARD_METHODS:
                register_fsdp_forward_method(net, method)
