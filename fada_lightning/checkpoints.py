"""Reading `fada fit` checkpoints outside a Trainer (`fada sample`, `fada evaluate`, a distiller's teacher).

A checkpoint is a file, or the folder of shards a sharded run writes (FSDP2, or FSDP with
`state_dict_type: sharded`; torch.distributed.checkpoint). A folder is read whole into this one
process without any process group: its weights and Lightning's metadata (meta.pt), not the
optimizer states, which only resuming a run needs (`--ckpt_path` reads folders itself).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME

SHARDED_WEIGHTS = ("state_dict", "model")  # ModelParallelStrategy (FSDP2) / FSDPStrategy's sharded format


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict:
    """The checkpoint at `path` (file or folder of shards) as one dict on the CPU: "state_dict",
    "hyper_parameters", "global_step", ... (`weights_only`: refuse pickled objects in a file)."""
    path = Path(path).expanduser()
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a folder but not a sharded checkpoint (no .metadata file of "
                         "torch.distributed.checkpoint in it)")
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading into this process", which is the intent
        warnings.simplefilter("ignore", UserWarning)
        checkpoint = _load_state_dict_from_keys(set(SHARDED_WEIGHTS), checkpoint_id=path)
    if "model" in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    if not checkpoint.get("state_dict"):
        raise ValueError(f"sharded checkpoint {path} holds no weights under {SHARDED_WEIGHTS}")
    meta = path / _METADATA_FILENAME
    if meta.is_file():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=weights_only))
    return checkpoint


def read_metadata(path: str | Path) -> dict:
    """Lightning's metadata of a checkpoint ("global_step", "hyper_parameters", ...) without reading
    its weights (a file is memory-mapped; a folder keeps them in meta.pt)."""
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    return read_checkpoint(path, weights_only=False)
