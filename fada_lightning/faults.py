"""Deterministic corruptions of shard members, for the fault tests and bench/fuzz_decode.py.

    mutate(data, kind, rng, others) -> bytes      kind in MUTATIONS; `others`: the sample's other members
"""
from __future__ import annotations

import numpy as np

MUTATIONS = ("flip", "truncate", "zero_length", "swap_member", "shuffle_chunks", "header")


def mutate(data: bytes, kind: str, rng: np.random.Generator, others: list[bytes] = ()) -> bytes:
    """One corrupted copy of `data`:
    flip: 1-200 random bytes XOR-ed with non-zero values; truncate: cut at a random length;
    zero_length: b""; swap_member: another member's bytes in its place (a wav or json named .mp4);
    shuffle_chunks: the file cut into 2-8 pieces put back in another order; header: its first 64
    bytes random."""
    array = np.frombuffer(data, np.uint8).copy()
    if kind == "flip":
        where = rng.integers(0, len(array), int(rng.integers(1, 201)))
        array[where] ^= rng.integers(1, 256, len(where)).astype(np.uint8)
        return array.tobytes()
    if kind == "truncate":
        return data[:int(rng.integers(0, len(data)))]
    if kind == "zero_length":
        return b""
    if kind == "swap_member":
        return others[int(rng.integers(len(others)))] if others else b""
    if kind == "shuffle_chunks":
        cuts = np.sort(rng.choice(np.arange(1, len(data)), int(rng.integers(1, 8)), replace=False))
        pieces = np.split(array, cuts)
        return b"".join(pieces[i].tobytes() for i in rng.permutation(len(pieces)))
    if kind == "header":
        array[:64] = rng.integers(0, 256, min(64, len(array))).astype(np.uint8)
        return array.tobytes()
    raise ValueError(f"unknown mutation {kind!r}; one of {MUTATIONS}")


def mutations(data: bytes, count: int, seed: int = 0, others: list[bytes] = (),
              kinds: tuple[str, ...] = MUTATIONS) -> list[tuple[str, bytes]]:
    """`count` (kind, corrupted bytes), kinds in turn, half of all cases flips (the commonest damage)."""
    rng = np.random.default_rng(seed)
    plan = [kinds[i // 2 % len(kinds)] if i % 2 else "flip" for i in range(count)]
    return [(kind, mutate(data, kind, rng, others)) for kind in plan]
