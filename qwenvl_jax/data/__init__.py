"""Data sets for training: JSONL records -> grain pipeline -> static-shape numpy batches.

Our code here never imports jax. grain itself imports `jax.profiler` when jax is installed, so the
pipeline names (which need grain) are loaded lazily: the record parsers stay free of it.
"""

import importlib

from qwenvl_jax.data.records import REASONS, BadRecord, DPORecord, SFTRecord, parse_line, read_jsonl

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

__all__ = [*_PIPELINE, "REASONS", "BadRecord", "DPORecord", "SFTRecord", "parse_line", "read_jsonl"]


def __getattr__(name):
    if name in _PIPELINE:
        return getattr(importlib.import_module("qwenvl_jax.data.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
