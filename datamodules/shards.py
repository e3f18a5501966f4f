"""Shard lists (SPEC 5): what `train_shards` / `val_shards` name, and which of them each (rank, worker) reads."""
from __future__ import annotations

import glob
import os

import webdataset as wds



def is_remote(url: str) -> bool:
    """True for anything webdataset opens that is not a local path (http://, s3://, pipe:, ...)."""
    return "://" in url or url.startswith("pipe:")


def resolve_shards(spec: str | list[str] | None) -> list[str]:
    """A directory (its *.tar, sorted), a glob, brace notation ("x-{00000..00007}.tar"), a URL,
    or a list of any of these -> a flat list of shard URLs. Whether listed files exist is
    checked by `check_local_shards`; an empty directory or a glob matching nothing fails here."""
    if not spec:
        return []
    if not isinstance(spec, str):
        return [url for item in spec for url in resolve_shards(item)]
    if is_remote(spec) or "{" in spec:
        return wds.shardlists.expand_urls(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in directory {path}")
        return found
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"no shards match {path}")
        return found
    return [path]


def is_manifest(spec) -> bool:
    """A `fada prepare` (or synthetic-world) manifest: a local path to a .json file."""
    return isinstance(spec, str) and spec.endswith(".json") and not is_remote(spec)


def read_manifest(path: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """manifest.json -> ({tier: shard paths}, {shard path: clips it holds}); shard paths are relative to
    the manifest's folder. Each tier's shards are full but its last (`clips_per_shard` each: one number, or
    {tier: number} as fada prepare writes it)."""
    import json

    try:
        with open(path) as f:
            manifest = json.load(f)
        root, per = os.path.dirname(path), manifest["clips_per_shard"]  # one number, or one per tier
        tiers = {tier: [os.path.join(root, p) for p in manifest[tier]] for tier in ("strict", "lenient") if tier in manifest}
        per = {tier: per[tier] if isinstance(per, dict) else per for tier in tiers}
        sizes = {url: min(per[tier], manifest["samples"][tier] - i * per[tier])
                 for tier, urls in tiers.items() for i, url in enumerate(urls)}
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path} does not exist (fada prepare writes it last: "
                                "is the run finished?)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"manifest {path} is not a shard manifest ({type(err).__name__}: {err})") from None
    return tiers, sizes


def check_local_shards(urls: list[str], name: str) -> None:
    """One clear error, before training starts, for local shards that are missing or unreadable."""
    if not urls:
        raise FileNotFoundError(f"{name}: no shards found (give a directory of .tar files, a glob, "
                                f"brace notation like 'data/strict/strict-{{00000..00007}}.tar', or a list)")
    local = [u[len("file:"):] if u.startswith("file:") else u for u in urls if not is_remote(u)]
    missing = [p for p in local if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{name}: shard {', '.join(missing[:3])}{more} does not exist")
    unreadable = [p for p in local if not os.access(p, os.R_OK)]
    if unreadable:
        raise PermissionError(f"{name}: shard {unreadable[0]} is not readable")


def split_shards(urls: list, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    """This (rank, worker)'s shards: by rank, then by worker. Disjoint and covering over all pairs."""
    needed = world_size * num_workers
    if len(urls) < needed:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks x {num_workers} data workers: "
                         f"need at least {needed} shards (write smaller shards, or use fewer workers)")
    return list(urls)[rank::world_size][worker::num_workers]
