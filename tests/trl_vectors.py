"""TRL's own numbers (tests/data/trl_vectors.npz, its `_readme` says what each case is), read once per test
process and shared by the objective tests."""

from __future__ import annotations

import functools
import pathlib

import numpy as np

VECTORS = pathlib.Path(__file__).parent / "data" / "trl_vectors.npz"


@functools.cache
def vectors() -> dict[str, np.ndarray]:
    with np.load(VECTORS, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@functools.cache
def section(prefix: str) -> dict[str, np.ndarray]:
    """The arrays under `prefix` (e.g. "common/grpo/"), keyed by the rest of their path."""
    return {k[len(prefix) :]: v for k, v in vectors().items() if k.startswith(prefix)}
