"""requirements.lock agrees with pyproject.toml: the same direct dependencies, each at a version
its range admits. `make lock` re-resolves after an edit; this catches the edit made without it."""
import re
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT_VIA = "fada-lightning (pyproject.toml)"


def declared_requirements(pyproject: Path) -> dict[str, Requirement]:
    """Direct dependencies of the project and its dev extra (the extra `make lock` resolves)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {canonicalize_name(r.name): r for r in reqs}


def locked_pins(lock: Path) -> list[tuple[str, Version, Marker | None, set[str]]]:
    """(name, version, marker, what it is via) for every `name==version [; marker]` in a uv-compiled lock."""
    pins, via = [], None
    for line in lock.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9._-]+)==(\S+)\s*(?:;\s*(.+))?$", line)
        if pin:
            name, version, marker = pin.groups()
            via = set()
            pins.append((canonicalize_name(name), Version(version), Marker(marker) if marker else None, via))
        elif via is not None and (note := re.match(r"^\s*#\s*(?:via\s+)?(\S.*)$", line)) and note.group(1) != "via":
            via.add(note.group(1).strip())
    return pins


def disagreements(pyproject: Path, lock: Path) -> list[str]:
    declared = declared_requirements(pyproject)
    pins = locked_pins(lock)
    problems = []
    for name, req in declared.items():
        versions = [version for pin, version, _, _ in pins if pin == name]
        if not versions:
            problems.append(f"{req} is in pyproject.toml but not in {lock.name}")
        problems += [f"{lock.name} pins {name}=={v}, outside pyproject.toml's {req}"
                     for v in versions if not req.specifier.contains(v, prereleases=True)]
    problems += [f"{lock.name} pins {name} for the project, but pyproject.toml does not declare it"
                 for name, _, _, via in pins if PROJECT_VIA in via and name not in declared]
    return problems


def test_the_lock_agrees_with_pyproject():
    problems = disagreements(ROOT / "pyproject.toml", ROOT / "requirements.lock")
    assert not problems, "run `make lock` and commit requirements.lock:\n" + "\n".join(problems)


def test_the_check_sees_a_dependency_added_to_one_file_only(tmp_path):
    pyproject, lock = (ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.lock").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"pyyaml",', '"pyyaml",\n    "rich>=13",'))
    (tmp_path / "requirements.lock").write_text(lock)
    assert disagreements(tmp_path / "pyproject.toml", tmp_path / "requirements.lock") == [
        "rich>=13 is in pyproject.toml but not in requirements.lock"]

    (tmp_path / "pyproject.toml").write_text(pyproject.replace('    "pyyaml",\n', ""))
    assert disagreements(tmp_path / "pyproject.toml", tmp_path / "requirements.lock") == [
        "requirements.lock pins pyyaml for the project, but pyproject.toml does not declare it"]

    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"lightning>=2.6.6"', '"lightning>=2.7"'))
    assert disagreements(tmp_path / "pyproject.toml", tmp_path / "requirements.lock") == [
        "requirements.lock pins lightning==2.6.6, outside pyproject.toml's lightning>=2.7"]


def test_torch_and_torchaudio_are_locked_as_a_pair_that_loads():
    pins = {name: version for name, version, marker, _ in locked_pins(ROOT / "requirements.lock") if marker is None}
    assert pins["torch"] == pins["torchaudio"] == Version("2.11.0")
    import torch
    import torchaudio
    assert torch.__version__.split("+")[0] == torchaudio.__version__.split("+")[0]
