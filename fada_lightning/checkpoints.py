"""Writing, checking and reading `fada fit` checkpoints.

A checkpoint is a file, or the folder of shards a sharded run writes (FSDP2, or FSDP with
`state_dict_type: sharded`; torch.distributed.checkpoint). A folder is read whole into this one
process without any process group: its weights and Lightning's metadata (meta.pt), not the
optimizer states, which only resuming a run needs (`--ckpt_path` reads folders itself).

Files are written by `AtomicCheckpointIO`: beside the target, flushed to disk, renamed over it, so
a kill at any instant leaves the previous checkpoint or the new one, never a part of one (FSDP2's
folders likewise: strategies.FSDP2.save_checkpoint, `recover_folder_swap`). Every
checkpoint records its role ("teacher" or "student": `checkpoint_role`), and a file that is not a
checkpoint, or one of the wrong role, is refused in one line (`CheckpointError`).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.load import _METADATA_FILENAME

from .presets import ConfigError

# the role of checkpoints written before roles were recorded, by the class that wrote them
ROLE_OF_MODULE = {"TeacherModule": "teacher", "DistillModule": "student"}


class CheckpointError(ConfigError):
    """A file that is not a readable checkpoint, or a checkpoint given where another role is needed."""


def checkpoint_role(checkpoint: dict) -> str | None:
    """"teacher", "student", ... as recorded at save time (older files: from the class that wrote them)."""
    if checkpoint.get("fada_role"):
        return checkpoint["fada_role"]
    module = checkpoint.get("fada_module") or checkpoint.get("hyper_parameters", {}).get("_class_path") or ""
    return ROLE_OF_MODULE.get(module.rsplit(".", 1)[-1])


def describe(checkpoint: dict) -> str:
    """'a student checkpoint (distillers.perflow.PeRFlow..., step 600)' for messages."""
    role = checkpoint_role(checkpoint) or "fada-lightning"
    module = checkpoint.get("fada_module") or checkpoint.get("hyper_parameters", {}).get("_class_path") or "?"
    return f"a {role} checkpoint ({module}, step {checkpoint.get('global_step', '?')})"


def check_role(path, checkpoint: dict, expected: str, hint: str) -> None:
    role = checkpoint_role(checkpoint)
    if role is not None and role != expected:
        raise CheckpointError(f"{path} is {describe(checkpoint)}, but a {expected} checkpoint is needed here: {hint}")


def check_checkpoint_file(path: Path) -> None:
    """One line for a file that cannot be a torch.save checkpoint: empty, truncated, or something else."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint ({size} bytes, not a complete torch.save zip archive: "
                              "truncated, or another kind of file)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, with local files written so that no kill can damage one:
    torch.save into `.NAME.partial` in the target's own folder, fsync, rename over NAME, fsync the
    folder. (Lightning's own write goes through a temporary file in $TMPDIR, which on another
    filesystem is copied, not renamed: a kill then leaves the target cut short.) The partial name is
    fixed, so a killed write leaves at most one, which the next write of that checkpoint replaces.
    Loading a damaged file falls back to the newest readable checkpoint beside it, saying so."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None) -> dict:
        if not _is_local_file_protocol(path) or not Path(path).is_file():
            return super().load_checkpoint(path, map_location, weights_only)
        path = Path(path)
        try:
            check_checkpoint_file(path)
            return super().load_checkpoint(path, map_location, weights_only)
        except (CheckpointError, RuntimeError, EOFError) as err:
            fallback = newest_readable_sibling(path)
            if fallback is None:
                raise CheckpointError(str(err) if isinstance(err, CheckpointError) else
                                      f"{path} is damaged ({type(err).__name__}: {err})") from None
            warnings.warn(f"{path.name} is damaged ({err}); resuming from {fallback} instead")
            return super().load_checkpoint(fallback, map_location, weights_only)


def write_atomically(checkpoint: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def newest_readable_sibling(path: Path) -> Path | None:
    """The checkpoint beside `path` with the highest global step that loads, or None."""
    steps = []
    for other in path.parent.glob("*.ckpt"):
        if other == path or not other.is_file():
            continue
        try:
            check_checkpoint_file(other)
            steps.append((torch.load(other, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1), other))
        except Exception:
            continue
    return max(steps)[1] if steps else None

def recover_folder_swap(path: Path) -> None:
    """If a kill fell between `FSDP2.save_checkpoint`'s two renames, `path` is missing and its previous
    folder waits as `.NAME.old` (the new one, complete, as `.NAME.partial`): put the new one in place."""
    partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    if path.exists() or not old.exists():
        return
    os.replace(partial if (partial / ".metadata").is_file() else old, path)


SHARDED_WEIGHTS = ("state_dict", "model")  # ModelParallelStrategy (FSDP2) / FSDPStrategy's sharded format


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict:
    """The checkpoint at `path` (file or folder of shards) as one dict on the CPU: "state_dict",
    "hyper_parameters", "global_step", ... (`weights_only`: refuse pickled objects in a file)."""
    path = Path(path).expanduser()
    recover_folder_swap(path)
    if path.is_file():
        check_checkpoint_file(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{path} is a damaged checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
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


def read_metadata(path: str | Path, weights_only: bool = False) -> dict:
    """Lightning's metadata of a checkpoint ("global_step", "hyper_parameters", ...) without reading
    its weights (a file is memory-mapped; a folder keeps them in meta.pt)."""
    path = Path(path).expanduser()
    recover_folder_swap(path)
    if is_sharded_checkpoint(path):
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
    return read_checkpoint(path, weights_only=weights_only)
