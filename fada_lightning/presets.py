"""Model presets are data: YAML files in the bundled `configs/presets/` (or any path)."""
from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser


class ConfigError(ValueError):
    """A problem with what the user configured (a path, a checkpoint, a preset): `fada` prints it
    as one line and exits, without a traceback."""


def bundled_config_dir() -> Path:
    return Path(str(resources.files("fada_lightning.configs")))


def find_config(name: str | Path) -> Path:
    """A path that exists is used as given; a bare name is looked up among the bundled configs."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    bundled = bundled_config_dir() / path
    if bundled.exists():
        return bundled
    available = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().rglob("*.yaml"))
    raise FileNotFoundError(f"config {str(name)!r} is neither a file nor a bundled config; bundled: {', '.join(available)}")


def config_bases(path: Path) -> list[Path]:
    """The chain of configs `path` overrides, outermost first: a config's top-level `base: NAME` names
    the config it changes (a bundled name, or a path relative to it or to the current folder)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    base = config.get("base") if isinstance(config, dict) else None
    if base is None:
        return []
    beside = Path(path).parent / base
    base_path = beside if beside.exists() else find_config(base)
    return [*config_bases(base_path), base_path]


def load_config(name: str | Path) -> dict:
    """A config as plain YAML data with its bases merged in (mappings merged key by key, anything else
    replaced), for tools that read configs; `fada fit --config NAME --print_config` shows how LightningCLI
    resolves it."""
    path = find_config(name)
    merged: dict = {}
    for part in [*config_bases(path), path]:
        merged = _merge(merged, yaml.safe_load(part.read_text()) or {})
    merged.pop("base", None)
    return merged


def _merge(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def load_preset(preset: str | dict) -> dict:
    """'micro' | 'sd15' | a YAML path | an already resolved dict -> dict(frame_size, codec, net, audio_features)."""
    if isinstance(preset, dict):
        return copy.deepcopy(preset)
    name = preset if preset.endswith((".yaml", ".yml")) else f"presets/{preset}.yaml"
    with open(find_config(name)) as f:
        resolved = yaml.safe_load(f)
    missing = {"frame_size", "codec", "net", "audio_features"} - set(resolved)
    if missing:
        raise ValueError(f"preset {preset!r} lacks {sorted(missing)}")
    resolved.setdefault("name", Path(name).stem)
    return resolved


@functools.cache
def config_arguments(cls: type) -> frozenset[str]:
    """The constructor arguments a config may give `cls`, as LightningCLI resolves them: its own and
    those of its parents that it forwards with **kwargs (less any it passes itself)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init", fail_untyped=False)
    return frozenset(a.dest.split(".")[1] for a in parser._actions if a.dest.startswith("init."))
