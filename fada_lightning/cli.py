"""`fada`: LightningCLI's fit / validate / test / predict, plus the tools in TOOLS (`fada --help` lists all).

    fada fit --config teacher.yaml            # bare name: a bundled config; a path: that file
    fada fit --config teacher.yaml --print_config
    fada sample --ckpt CKPT --image face.png --audio speech.wav -o out.mp4
    fada export CKPT --out DIR                # a diffusers folder: FadaAvatarPipeline.from_pretrained(DIR)
    fada evaluate --ckpt CKPT                 # FID, FVD, Sync-D/C, E-FID, IQA, NFE-D on held-out clips
    fada curve runs/teacher/tb/run            # every kept checkpoint evaluated: metrics against steps
    fada ablate --config tables/distillers.yaml
    fada prepare raw_videos/ --out shards/    # videos -> face clips scored and tiered, shards + manifest
    fada cache SHARDS --preset sd15 --out cached/   # add VAE latents + audio features to shards
"""
from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import warnings
from pathlib import Path

import yaml

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .checkpoints import AtomicCheckpointIO, check_role, read_checkpoint, recover_folder_swap
from .presets import ConfigError, config_arguments, config_bases, find_config


LIGHTNING_COMMANDS = {
    "fit": "train a teacher or distil a student from a config: fada fit --config teacher.yaml",
    "validate": "run the validation loop of a config on a checkpoint (--ckpt_path)",
    "test": "run the test loop of a config on a checkpoint (--ckpt_path)",
    "predict": "run the predict loop of a config on a checkpoint (--ckpt_path)",
}
# name: (module:function, one line for `fada --help`)
TOOLS = {
    "sample": ("fada_lightning.sample:main", "a talking-head mp4 from a checkpoint, one face image and one audio file"),
    "export": ("fada_lightning.export:main", "a checkpoint as a diffusers folder that FadaAvatarPipeline loads"),
    "evaluate": ("fada_lightning.evaluate:main", "FID, FVD, Sync-D/C, E-FID, IQA and NFE-D of a checkpoint on held-out clips"),
    "curve": ("fada_lightning.curve:main", "a run's held-out curve: every kept checkpoint evaluated, then plotted"),
    "ablate": ("fada_lightning.ablate:main", "train and evaluate every row of an ablation table (resumable)"),
    "prepare": ("datamodules.prepare.run:main", "raw talking videos -> quality-scored strict and lenient shards"),
    "cache": ("datamodules.cache:main", "add VAE latents and audio features to shards, so training decodes nothing"),
}


def print_commands() -> None:
    """`fada`, `fada -h`: every command with one line each; `fada COMMAND --help` has its options."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *TOOLS]))
    lines = ["usage: fada COMMAND [options]      (fada COMMAND --help: that command's options)", "",
             "training (LightningCLI; configs are bundled names such as teacher.yaml, or paths):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    print("\n".join(lines))


class FadaParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors lead with the one line that says what is wrong (and, for a
    misspelled option, what is accepted) instead of the usage text and jsonargparse's union dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parser trying one type of a union: jsonargparse handles it
            super().error(message, ex)
        sys.exit(f"fada: {explain_parse_error(message, self)}\n(`fada {sys.argv[1] if len(sys.argv) > 1 else ''} "
                 f"--help` lists every option; --print_config shows the config as read)")


def explain_parse_error(message: str, parser=None) -> str:
    """jsonargparse's error -> 'where: what', where naming the option's path and class, with close
    matches and the accepted names for an option that is not accepted."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    unknown = re.match(r"unrecognized arguments: (\S+)", lines[0])
    if unknown:
        given = unknown.group(1).split("=")[0]
        options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
        close = difflib.get_close_matches(given, options, n=3)
        return f"{given} is not an option" + (f"; did you mean {', '.join(close)}?" if close else "")
    keys = [m.group(1) for line in lines if (m := re.match(r'Parser key "([^"]+)"', line))]
    classes = [m.group(1) for line in lines if (m := re.match(r"Problem with given class_path '([^']+)'", line))]
    noise = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Problem with given class_path",
             "Expected a <class 'NoneType'>", "Given value")
    causes = [line for line in lines if line and not line.startswith(noise)]
    if not keys or not causes:
        return message
    where = ".init_args.".join(keys) + (f" ({classes[-1]})" if classes else "")
    what = causes[0]
    rejected = re.match(r"Option '(\w+)' is not accepted", what)
    if rejected and classes:
        module_name, _, name = classes[-1].rpartition(".")
        try:
            accepted = sorted(config_arguments(getattr(importlib.import_module(module_name), name)))
        except (ImportError, AttributeError):
            accepted = []
        close = difflib.get_close_matches(rejected.group(1), accepted, n=3)
        what += (f"; did you mean {', '.join(close)}?" if close else "") + (
            f" It takes: {', '.join(accepted)}" if accepted else "")
    return f"{where}: {what}"


class FadaCLI(LightningCLI):
    """Model and data are chosen in YAML by `class_path` (any LightningModule / DataModule).
    Checkpoints are written atomically (checkpoints.AtomicCheckpointIO), a `--ckpt_path` of another
    role than the config's model is refused, and a run never forks silently: a fit into a run folder
    that already holds checkpoints must resume (`--ckpt_path last`) or take another name."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--base", type=str | None, default=None,
                            help="the config a config file overrides (read before it; set in YAML, `base: distill.yaml`)")
        # the data is cut and featurised as the model needs it: a data module that takes these gets the model's
        from datamodules.streaming import model_settings

        for key in model_settings(None):
            parser.link_arguments("model", f"data.init_args.{key}", apply_on="instantiate",
                                  compute_fn=lambda model, key=key: model_settings(model)[key])

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            check_resumable(Path(ckpt_path), self.config[subcommand]["model"]["class_path"])
        super()._parse_ckpt_path()

    def _use_atomic_checkpoints(self) -> None:
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def before_fit(self) -> None:
        self._use_atomic_checkpoints()
        for folder in checkpoint_folders(self.trainer):  # a sharded save a kill cut between its renames
            for old in folder.glob(".*.old") if folder.is_dir() else []:
                recover_folder_swap(old.with_name(old.name[1:-len(".old")]))
        if not self.config["fit"].get("ckpt_path"):
            refuse_to_fork(self.trainer)

    def before_validate(self) -> None:
        self._use_atomic_checkpoints()

    before_test = before_predict = before_validate


def check_resumable(path: Path, model_class: str) -> None:
    """`--ckpt_path FILE` must be a readable checkpoint of the role the config's model trains."""
    checkpoint = read_checkpoint(path, weights_only=False)
    module_name, _, name = model_class.rpartition(".")
    expected = getattr(getattr(importlib.import_module(module_name), name), "checkpoint_role", None)
    if expected is not None:
        check_role(path, checkpoint, expected, f"this config trains a {name}; give --ckpt_path a checkpoint "
                   "of one of its own runs, or use the config that wrote it")


def checkpoint_folders(trainer) -> list[Path]:
    """Where the trainer's checkpoint callbacks write (as ModelCheckpoint resolves it: logger folder/checkpoints)."""
    folders = []
    for callback in trainer.checkpoint_callbacks:
        folder = callback.dirpath
        if folder is None and trainer.loggers and trainer.loggers[0].log_dir:
            folder = os.path.join(trainer.loggers[0].log_dir, "checkpoints")
        if folder:
            folders.append(Path(folder))
    return folders


def refuse_to_fork(trainer) -> None:
    """A new fit into a run folder that already holds checkpoints would mix two runs: say what to do."""
    for folder in checkpoint_folders(trainer):
        found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
        if found:
            raise ConfigError(f"{folder} already holds checkpoints of a run ({', '.join(p.name for p in found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}): resume it with --ckpt_path last, start "
                              "another with --trainer.logger.init_args.version NAME, or delete that folder")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite `--config NAME` / `--config=NAME` so a bare name finds the bundled config, and a config
    that names a `base` is read after its base (`--config distill_perflow.yaml` -> `--config
    distill.yaml --config distill_perflow.yaml`). The first config must be a whole one (an override,
    such as an ablation row, comes after its base)."""
    out, i, configs = [], 0, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv) or arg.startswith("--config="):
            name = argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]
            path = find_config(name)
            chain = [path] if configs else [*config_bases(path), path]  # a later one overrides what is there
            if not configs:
                check_whole_config(chain[0])
            out += [f"--config={p}" for p in chain]
            configs += 1
            i += 2 if arg == "--config" else 1
            continue
        out.append(arg)
        i += 1
    return out


def check_whole_config(path) -> None:
    """A config whose model or data names no class_path only overrides another: say how to use it."""
    text = Path(path).read_text()
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        return
    partial = [k for k in ("model", "data") if isinstance(config.get(k), dict) and "class_path" not in config[k]]
    if partial:
        usage = next((line.lstrip("# ").strip() for line in text.splitlines() if line.lstrip("# ").startswith("fada fit")),
                     f"fada fit --config BASE.yaml --config {path}")
        raise ConfigError(f"{path} overrides a base config ({' and '.join(partial)} name no class_path): "
                          f"give the base first, as in: {usage}")


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # a user's own module in the current directory, named by class_path
        sys.path.insert(0, os.getcwd())
    if not argv or argv[0] in ("-h", "--help"):
        print_commands()
        sys.exit(0 if argv else 2)
    if argv[0] in TOOLS:
        module_name, function = TOOLS[argv[0]][0].split(":")
        getattr(importlib.import_module(module_name), function)(argv[1:])
        return
    try:
        argv = resolve_config_args(argv)
    except (FileNotFoundError, ConfigError) as err:
        sys.exit(f"fada: {err}")
    # Each data worker yields exactly its share, so a streaming dataset's __len__ is exact here.
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads the (resolved) command line itself
    try:
        FadaCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, parser_class=FadaParser)
    except Exception as err:
        config_error = _config_error(err)
        if config_error is None:
            raise
        sys.exit(f"fada: {config_error}")


def _config_error(err: BaseException | None) -> BaseException | None:
    """The error to show alone for an exception LightningCLI raised while building the config's classes:
    a ConfigError anywhere in the chain, or what a class raised (a ValueError of a distiller's checks)
    under jsonargparse's "Does not validate against any of the Union subtypes" wrapper; None otherwise."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    found = next((e for e in chain if isinstance(e, ConfigError)), None)
    if found is None and chain and "Does not validate against any of the Union subtypes" in str(chain[0]):
        found = chain[-1]
    return found


if __name__ == "__main__":
    main()
