"""Run a checks script on 8 fake CPU devices in subprocesses and collect its PASS/FAIL lines.

XLA reads `--xla_force_host_platform_device_count` once, when jax first initialises, and the pytest
process has already initialised jax, hence the subprocesses. A checks script prints `PASS <name> ...`
or `FAIL <name>: <reason>` per check; groups of checks run in parallel processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# XLA:CPU's cheapest code generation: the test processes run tiny programs a few times each, so compiling
# dominates, and this takes a sixth to a half off it (equality checks compare runs made alike). It
# changes LLVM's passes only, not the HLO the sharding and collective checks read.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` fake CPU devices, compiled cheaply."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def run_check_groups(script: Path, groups) -> tuple[dict[str, tuple[str, str]], str]:
    """`({check name: ("PASS" | "FAIL", line)}, whole output)` from running each group in its process."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")

    def run(names):
        return subprocess.run(
            [sys.executable, "-W", "error", str(script), *names],
            env=env,
            cwd=script.parent.parent,
            capture_output=True,
            text=True,
            timeout=900,  # a loaded 2-core machine runs three of these at once
        )

    with ThreadPoolExecutor(len(groups)) as pool:
        procs = list(pool.map(run, groups))
    output = "\n".join(p.stdout + p.stderr for p in procs)
    status = {}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASS", "FAIL"):
            status[rest.split(" ")[0].rstrip(":")] = (word, line)
    return status, output


def assert_passed(report, name: str) -> None:
    status, output = report
    assert name in status, f"{name} did not report:\n{output[-4000:]}"
    word, line = status[name]
    assert word == "PASS", f"{line}\n{output[-4000:]}"
