"""The training loop end to end (`qwenvl-jax train`), in subprocesses on CPU, float32.

- resume: a run killed with SIGKILL after its step-3 checkpoint and resumed gives BITWISE the losses of an
  uninterrupted run (params, optimizer state, rng and data iterator state all restored);
- SIGTERM saves a checkpoint at the current step and exits 3 without `final/` (so `train && export`
  stops there);
- what happens before step 1 (loading, compiling) is said, not silent;
- the loss falls over the tiny run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multidevice import xla_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sft_tiny_cpu.yaml"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}


def _cmd(run_dir: Path, *sets: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "qwenvl_jax.cli",
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"run_dir={run_dir}",
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def _wait(proc: subprocess.Popen, cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode})")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("A")
    out = subprocess.run(_cmd(run, "steps=6"), env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loading model: preset tiny" in out.stderr, out.stderr
    assert "compiling the train step for batches of 2x2x96" in out.stderr, out.stderr
    return _metrics(run)


def test_resume_after_sigkill_is_bitwise(tmp_path, uninterrupted):
    sets = ("steps=6", "checkpoint.every=1", "checkpoint.keep=10")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(tmp_path, *sets), env=ENV, stderr=log)
        _wait(proc, lambda: 3 in _steps(tmp_path))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(_steps(tmp_path))
    assert 3 <= killed_at < 6, killed_at  # really interrupted mid-run
    out = subprocess.run(_cmd(tmp_path, *sets), env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "resumed from step" in out.stderr
    got = _metrics(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in got] == [m["loss"] for m in uninterrupted]  # float equality
    assert [m["tokens"] for m in got] == [m["tokens"] for m in uninterrupted]


def test_sigterm_saves_and_exits_3(tmp_path):
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(
            _cmd(tmp_path, "steps=100000", "checkpoint.every=100000"), env=ENV, stderr=log
        )
        _wait(proc, lambda: len(_metrics(tmp_path)) >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 3, (tmp_path / "run.log").read_text()
    last = _metrics(tmp_path)[-1]["step"]
    assert _steps(tmp_path) == [last]
    assert not (tmp_path / "final").exists()
    assert f"SIGTERM: saved step {last}; run the same command to resume" in (tmp_path / "run.log").read_text()


def test_loss_falls(uninterrupted):
    losses = [m["loss"] for m in uninterrupted]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(m["skipped"] == 0 and m["tokens"] > 0 for m in uninterrupted)


def test_checkpointer_restores_latest_complete_step(tmp_path):
    import shutil

    import jax.numpy as jnp
    import numpy as np
    import optax

    from qwenvl_jax.train.checkpoints import TrainCheckpointer
    from qwenvl_jax.train.state import TrainState

    tx = optax.adam(1e-2)

    def state_at(k):
        params = {"w": jnp.full((3, 2), float(k)), "b": {"x": jnp.arange(4.0) * k}}
        return TrainState(jnp.int32(k), params, tx.init(params), jnp.array([k, 7], jnp.uint32))

    ck = TrainCheckpointer(tmp_path / "ck", save_every=1, keep=5)
    for k in (1, 2):
        assert ck.save(k, state_at(k), f"data{k}".encode(), {"k": k})
    ck.close()
    # A save of step 3 that died before Orbax finalized it: a partial temporary directory.
    partial = tmp_path / "ck" / "3.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "ck" / "2", partial)
    shutil.rmtree(partial / "state")
    ck = TrainCheckpointer(tmp_path / "ck", save_every=1, keep=5)
    step, state, data, config = ck.restore_latest(state_at(0))
    ck.close()
    assert (step, data, config) == (2, b"data2", {"k": 2})
    want = state_at(2)
    for a, b in zip(jax_leaves(state), jax_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(state.opt_state) is type(want.opt_state)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
