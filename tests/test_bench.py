"""The GPU benchmark scripts (bench/bench_{train,prefill,generate,grpo}.py), run at tiny size on CPU.

Each script runs in a subprocess exactly as on the GPU (a parent that spawns one worker per side and
shape), with both sides, and every JSON record must carry positive, finite figures. The train benchmark
is also a parity check: both sides draw the same weights and see the same batch, so in float32 their
first-step losses agree to float32 rounding. A `sitecustomize` on PYTHONPATH records, in every process,
whether grain, trl or qwen_vl_utils got imported: the GPU image has none of them, so only the GRPO
benchmark's TRL worker may import trl (its wheels travel with that run, docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU = ("grain", "trl", "qwen_vl_utils")

SITECUSTOMIZE = f"""
import atexit, json, os, sys

def _record():
    bad = sorted({{m.split(".")[0] for m in sys.modules}} & set({ABSENT_ON_GPU!r}))
    side = None
    if "--worker" in sys.argv:  # the job file still exists: the parent removes it after the worker exits
        with open(sys.argv[sys.argv.index("--worker") + 1]) as f:
            side = json.load(f)["side"]
    with open(os.path.join(os.environ["BENCH_IMPORT_LOG"], f"{{os.getpid()}}.json"), "w") as f:
        f.write(json.dumps({{"argv": sys.argv, "bad": bad, "side": side}}))

atexit.register(_record)
"""


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(tmp_path, script: str, *args: str, may_import: dict[str, set[str]] | None = None) -> list[dict]:
    """Run `bench/<script>` at tiny size on CPU; return its JSON records (and check its imports: none of
    ABSENT_ON_GPU, except `may_import[side]` in that side's worker)."""
    site, log = tmp_path / "site", tmp_path / "imports"
    site.mkdir()
    log.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, BENCH_IMPORT_LOG=str(log))
    jsonl = tmp_path / "records.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / script), "--preset", "tiny", "--device", "cpu",
           "--jsonl", str(jsonl), "--jax-cache-dir", "", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout_records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert records == stdout_records
    assert any(line.startswith("| side |") for line in proc.stdout.splitlines())  # the markdown table
    processes = [json.loads(p.read_text()) for p in log.iterdir()]
    assert len(processes) >= 3  # the parent and at least two workers
    allowed = may_import or {}
    assert all(set(p["bad"]) <= allowed.get(p["side"], set()) for p in processes), processes
    return records


def positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, record)


def measured(records, **match) -> dict:
    rows = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    assert len(rows) == 1, (match, records)
    assert rows[0]["status"] == "ok", rows[0]
    assert "peak_bytes" in rows[0] and rows[0]["peak_bytes"] is None  # no device memory on CPU
    return rows[0]


def test_train_both_sides_and_loss_parity(tmp_path):
    records = run_bench(tmp_path, "bench_train.py", "--dtype", "float32")
    for side in ("ours", "hf"):
        r = measured(records, side=side)
        positive(r, "step_s", "step_ms", "tokens_per_s", "mfu", "model_flops", "first_loss", "last_loss")
        assert r["shape"] == "2x64" and r["remat"] == "full" and r["param_dtype"] == "float32"
    (parity,) = [r for r in records if r.get("kind") == "parity"]
    # Same weights and batch in float32: only summation order differs (observed ~1e-6 on a loss of ~6.5).
    assert parity["abs_diff"] < 1e-4, parity
    assert parity["loss_ours"] == measured(records, side="ours")["first_loss"]


def test_prefill_both_sides_and_logits_agree(tmp_path):
    records = run_bench(tmp_path, "bench_prefill.py", "--batches", "1")
    hf = measured(records, side="hf")
    ours = measured(records, side="ours", backend="xla")
    for r in (hf, ours):
        positive(r, "time_s", "time_ms", "tokens_per_s")
        assert r["rows"] == 1 and r["seq"] == 64
    # bf16 on both sides: logits of the same weights differ by bf16 rounding (observed ~0.05), not more.
    assert 0 <= ours["logits_max_abs_diff"] < 0.25, ours


def test_generate_both_sides_with_roofline(tmp_path):
    records = run_bench(tmp_path, "bench_generate.py")
    (bw,) = [r for r in records if r.get("kind") == "bandwidth"]
    assert bw["status"] == "ok"
    positive(bw, "bandwidth_Bps")
    for side in ("ours", "hf"):
        r = measured(records, side=side)
        positive(r, "prefill_s", "decode_s", "step_ms", "decode_tokens_per_s", "roofline_step_ms", "achieved",
                 "param_bytes", "kv_bytes")  # fmt: skip
        assert r["bandwidth_Bps"] == bw["bandwidth_Bps"]


def test_grpo_both_sides_same_prompts_and_phases(tmp_path):
    records = run_bench(tmp_path, "bench_grpo.py", may_import={"trl": {"trl"}})
    phases = ("gen", "reward", "old_log_prob", "ref", "update_actor", "update_weights")
    for side in ("ours", "trl"):
        r = measured(records, side=side)
        positive(r, "gen_tokens_per_s", "train_tokens_per_s", "step_tokens_per_s", "timing_s/gen",
                 "timing_s/reward", "timing_s/update_actor", "timing_s/step", "first_step_s",
                 "train_tokens")  # fmt: skip
        assert r["shape"] == "2 x 2 x 8" and r["gen_tokens"] == 2 * 2 * 8
        assert r["timing_s/old_log_prob"] == 0  # on-policy: neither side scores old log-probs
        # One timed step (tiny default): its phases are disjoint and cover the whole step.
        parts = sum(r[f"timing_s/{k}"] or 0.0 for k in phases)
        assert parts == pytest.approx(r["timing_s/step"], rel=1e-6), r
    assert measured(records, side="ours")["compile_s"] > 0
    (ratio,) = [r for r in records if r.get("kind") == "ratio"]
    positive(ratio, "gen_tokens_per_s_ours_over_trl", "train_tokens_per_s_ours_over_trl",
             "step_tokens_per_s_ours_over_trl")  # fmt: skip
    # The same prompt ids and pixels reached both samplers, and both trained on the same number of tokens.
    assert ratio["same_prompts"] and ratio["same_train_tokens"], ratio


def test_a_failing_worker_is_reported_not_fatal(tmp_path):
    """A worker that never finishes (here: killed at once by the job timeout) leaves a row saying so,
    and the next measurement still runs."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_prefill.py"), "--preset", "tiny", "--device", "cpu",
           "--batches", "1,2", "--job-timeout", "0.01", "--jax-cache-dir", ""]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["side"], r["rows"], r["status"]) for r in records] == [
        (side, rows, "timeout (0 s)") for rows in (1, 2) for side in ("hf", "ours")
    ]


def test_oom_is_classified():
    common = _common()

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name
        pass

    assert common.classify_error(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "OOM"
    assert (
        common.classify_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
        == "OOM"
    )
    assert common.classify_error(ValueError("bad\nshape")) == "error: ValueError: bad shape"


def test_flops_and_bytes_by_hand():
    """3B, one row of 1024 tokens with one 448x448 image (32x32 patches, 16 windows of 8x8 patches)."""
    common = _common()
    config = common.model_config("3B")
    decoder = 2 * (36 * 2048 * (2 * 2048 + 2 * 256 + 3 * 11008) + 2048 * 151936) * 1024
    decoder_attention = 36 * 2 * 1024**2 * 2048
    vision = (
        2 * (32 * (4 * 1280**2 + 3 * 1280 * 3420) + 1176 * 1280) * 1024 + 2 * (5120**2 + 5120 * 2048) * 256
    )
    vision_attention = 4 * 1280 * (28 * 16 * 64**2 + 4 * 1024**2)
    got = common.forward_flops(config, 1, 1024, common.image_grid(config, 448))
    assert got == decoder + decoder_attention + vision + vision_attention
    need = common.decode_bytes(config, rows=64, cache_len=640)
    assert need["kv_bytes"] == 2 * 36 * 2 * 128 * 640 * 64 * 2
    layer = (
        2048 * (2 * 2048 + 2 * 256 + 3 * 11008) + (2048 + 2 * 256) + 2 * 2048
    )  # matmuls, q/k/v bias, norms
    assert need["param_bytes"] == 2 * (36 * layer + 2048 + 151936 * 2048)


@pytest.mark.parametrize("text", ["4x", "0x64", "4*1024"])
def test_bad_shape_is_named(text):
    with pytest.raises(SystemExit, match=re.escape(repr(text))):
        _common().shapes(text)


def test_compute_at_scale_lora_at_tiny_size(tmp_path):
    """`bench/compute_at_scale.py lora` runs end to end (tiny widths; the 7B figure is in
    docs/benchmarks.md): the extrapolated counts are positive, and LoRA's vision blocks cost what their
    forward costs, well under full fine-tuning's forward + backward (the frozen tower has no backward)."""
    out = tmp_path / "lora.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compute_at_scale.py"), "lora", "--preset", "tiny",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for side in ("full", "lora"):
        assert all(math.isfinite(v) and v > 0 for v in figures[side].values()), figures[side]
    assert figures["lora"]["per_vision_block"] < 0.5 * figures["full"]["per_vision_block"]
    assert "LoRA / full" in proc.stdout
