"""`fada`: LightningCLI's fit / validate / test / predict, plus `sample`.

    fada fit --config teacher.yaml            # bare name: a bundled config; a path: that file
    fada fit --config teacher.yaml --print_config
    fada sample --ckpt CKPT --image face.png --audio speech.wav -o out.mp4
"""
from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from .presets import ConfigError, find_config


class FadaCLI(LightningCLI):
    """Model and data are chosen in YAML by `class_path` (any LightningModule / DataModule)."""


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite `--config NAME` / `--config=NAME` so a bare name finds the bundled config."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, str(find_config(argv[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(find_config(arg.split("=", 1)[1]))
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # a user's own module in the current directory, named by class_path
        sys.path.insert(0, os.getcwd())
    if argv and argv[0] == "sample":
        from .sample import main as sample_main

        sample_main(argv[1:])
        return
    try:
        argv = resolve_config_args(argv)
    except FileNotFoundError as err:
        sys.exit(f"fada: {err}")
    # Each data worker yields exactly its share, so a streaming dataset's __len__ is exact here.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads the (resolved) command line itself
    try:
        FadaCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except Exception as err:
        config_error = _config_error(err)
        if config_error is None:
            raise
        sys.exit(f"fada: {config_error}")


def _config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind err: jsonargparse re-raises what a class raised while it built it."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


if __name__ == "__main__":
    main()
