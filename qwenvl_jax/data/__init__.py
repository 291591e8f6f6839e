"""Data sets for training: JSONL / Parquet records -> grain pipeline -> static-shape numpy batches (SFT,
DPO) or lists of encoded prompts (GRPO).

Our code here never imports jax. grain itself imports `jax.profiler` when jax is installed, so the
pipeline names (which need grain) are loaded lazily: the record parsers stay free of it.
"""

import importlib

from qwenvl_jax.data.records import (
    REASONS,
    BadRecord,
    DPORecord,
    PromptRecord,
    SFTRecord,
    parse_line,
    read_jsonl,
)

_PIPELINE = (
    "BatchIterator",
    "EncodeRecords",
    "JsonlSource",
    "SkipCounter",
    "collate_pairs",
    "encode_dpo",
    "encode_sft",
    "make_batches",
    "make_loader",
)
_LAZY = {name: "qwenvl_jax.data.pipeline" for name in _PIPELINE} | {
    "make_prompt_batches": "qwenvl_jax.data.prompts",
    "encode_prompt": "qwenvl_jax.data.prompts",
    "ParquetSource": "qwenvl_jax.data.parquet",
}

__all__ = [
    *_LAZY,
    "REASONS",
    "BadRecord",
    "DPORecord",
    "PromptRecord",
    "SFTRecord",
    "parse_line",
    "read_jsonl",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
