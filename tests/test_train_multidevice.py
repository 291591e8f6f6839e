"""One SFT optimizer step on 8 fake CPU devices (meshes 8x1x1, 1x8x1, 1x4x2, 2x2x2) equals one device.

Runs `tests/train_multidevice_checks.py` in two subprocesses (the device-count flag only works before jax
initialises); each check is one test here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("train_multidevice_checks.py")
GROUPS = (("sft_step_8x1x1", "sft_step_1x4x2"), ("sft_step_1x8x1", "sft_step_2x2x2"))
ALL_CHECKS = [name for group in GROUPS for name in group]


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")

    def run(names):
        return subprocess.run(
            [sys.executable, "-W", "error", str(SCRIPT), *names],
            env=env,
            cwd=SCRIPT.parent.parent,
            capture_output=True,
            text=True,
            timeout=300,
        )

    with ThreadPoolExecutor(len(GROUPS)) as pool:
        procs = list(pool.map(run, GROUPS))
    output = "\n".join(p.stdout + p.stderr for p in procs)
    status = {}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASS", "FAIL"):
            status[rest.split(" ")[0].rstrip(":")] = (word, line)
    return status, output


def test_groups_cover_every_check():
    sys.path.insert(0, str(SCRIPT.parent))
    import train_multidevice_checks

    assert set(ALL_CHECKS) == set(train_multidevice_checks.CHECKS)


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_train_multidevice(report, name):
    status, output = report
    assert name in status, f"{name} did not report:\n{output[-4000:]}"
    word, line = status[name]
    assert word == "PASS", f"{line}\n{output[-4000:]}"
