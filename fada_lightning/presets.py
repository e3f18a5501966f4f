"""Model presets are data: YAML files in the bundled `configs/presets/` (or any path)."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml


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
