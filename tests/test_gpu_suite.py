"""bench/gpu_suite.py at tiny size on CPU: the files it writes, each job's exit status, and the deadline.

The whole tiny suite (nine jobs) takes ~3.5 min on 2 CPU cores, so the test runs a representative part:
preflight, parity and one benchmark (prefill, both sides); tests/test_bench.py runs every benchmark's tiny
mode on its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_suite(tmp_path: Path, *args: str, timeout: float) -> tuple[list[dict], str]:
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed last too: the device call's output tail carries it
    assert sorted(p.name for p in out.iterdir()) == ["suite.jsonl", "suite.log", "summary.md"]
    return results, summary


def test_parity_and_a_benchmark_write_records_and_summary(tmp_path):
    results, summary = run_suite(tmp_path, "--only", "preflight,parity,prefill_b16", timeout=600)
    assert [r["job"] for r in results] == ["preflight", "parity", "prefill_b16"]
    for r in results:
        assert (r["rc"], r["status"]) == (0, "ok"), r
        assert r["command"].startswith("python3 bench/") and r["seconds"] > 0 and r["records"]
    (pre,) = results[0]["records"]
    assert pre["jax_backend"] == "cpu" and set(pre["imports"].values()) == {"ok"}, pre
    parity = results[1]["records"]
    comparisons = [c for c in parity if c["kind"] == "comparison"]
    assert len(comparisons) == 6  # fp32 and bf16 on two inputs, and HF's own bf16 drift
    assert all(c["max_abs"] < 1e-4 for c in comparisons if c["dtype"] == "float32")
    assert parity[-1]["kind"] == "verdict" and parity[-1]["passed"], parity[-1]
    sides = {r["side"]: r for r in results[2]["records"]}
    assert sides.keys() == {"hf", "ours"} and all(r["status"] == "ok" for r in sides.values())
    ratio = sides["ours"]["tokens_per_s"] / sides["hf"]["tokens_per_s"]
    # The summary: versions, each job's row, the parity verdict, and the ratio ours/reference.
    assert "jax " in summary and "torch " in summary and "transformers " in summary
    assert all(f"| {r['job']} | ok |" in summary for r in results)
    assert "Verdict: passed." in summary
    assert f"| prefill_b16 | 1x64, ours xla | tokens/s | {sides['ours']['tokens_per_s']:.0f} |" in summary
    assert f"| {ratio:.3g}x |" in summary


def test_deadline_skips_jobs_that_no_longer_fit(tmp_path):
    # 40 s, less the 5 s reserve: preflight (estimate 15 s) starts; parity (45 s) can no longer fit after it,
    # nor can the train job after that.
    results, summary = run_suite(
        tmp_path, "--only", "preflight,parity,train_4x1024", "--deadline", "40", timeout=120
    )
    assert [(r["job"], r["status"]) for r in results] == [
        ("preflight", "ok"),
        ("parity", "skipped"),
        ("train_4x1024", "skipped"),
    ]
    for r in results[1:]:
        assert r["rc"] is None and r["records"] == [] and "before the deadline" in r["reason"], r
        assert f"| {r['job']} | skipped: {r['reason']} |" in summary
