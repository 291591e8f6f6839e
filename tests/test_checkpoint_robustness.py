"""Train checkpoints: restoring into the abstract state (one copy of the state alive), falling back from a
damaged latest step (and keeping it), relative paths; the sharded restore on 8 fake CPU devices."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from multidevice import xla_flags

from qwenvl_jax.checkpoint import CheckpointError
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.loading import random_model
from qwenvl_jax.train.checkpoints import TrainCheckpointer
from qwenvl_jax.train.lora import LoraConfig
from qwenvl_jax.train.optim import OptimConfig
from qwenvl_jax.train.state import TrainState, abstract_train_state, init_train_state

REPO = Path(__file__).resolve().parent.parent
OPT = OptimConfig(learning_rate=1e-3)
TX = optax.adam(1e-2)


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def _tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _same_trees(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------ abstract state


@pytest.mark.parametrize("mode", ["full", "frozen_vision", "lora"])
def test_abstract_train_state_matches_init(mode):
    model = random_model(Qwen25VLConfig.preset("tiny"))
    lora = LoraConfig() if mode == "lora" else None
    before = _live_bytes()
    _, abstract, frozen, _ = abstract_train_state(model, OPT, mode, lora, seed=3)
    assert _live_bytes() == before  # nothing allocated
    _, state, frozen_init, _ = init_train_state(model, OPT, mode, lora, seed=3)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert jax.tree.structure(frozen) == jax.tree.structure(frozen_init)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (s.shape, s.dtype)
        assert a.sharding == device


def test_resume_holds_one_copy_of_the_state(tmp_path):
    """Restore into `abstract_train_state`: the peak of live device bytes during the restore is the model
    with no state, plus ONE state; initialising a state first (the old resume) holds two."""
    config = Qwen25VLConfig.preset("tiny")
    model = random_model(config)
    _, state, _, _ = init_train_state(model, OPT, "full")
    state_bytes = _tree_bytes(state)
    ck = TrainCheckpointer(tmp_path / "ck", save_every=1, async_save=False)
    ck.save_now(5, state, b"it", {"run": 1})
    expected = jax.tree.map(np.asarray, state)
    del model, state
    gc.collect()

    # The loop's resume: the model is built, the abstract state derived, the model dropped ("full": no
    # frozen params), then the checkpoint restored.
    model = random_model(config)
    _, abstract, frozen, _ = abstract_train_state(model, OPT, "full")
    del model
    gc.collect()
    base = _live_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _live_bytes())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        restored = ck.restore_latest(abstract)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _live_bytes())
    assert restored.step == 5 and restored.skipped == [] and restored.data_state == b"it"
    _same_trees(restored.state, expected)
    assert _live_bytes() - base == state_bytes
    assert peak[0] - base <= state_bytes, (peak[0] - base, state_bytes)

    # The measurement sees a second copy: init first, then restore, holds two states.
    del restored
    gc.collect()
    model = random_model(config)
    _, state, _, _ = init_train_state(model, OPT, "full")
    del model
    gc.collect()
    again = ck.restore_latest(state)
    assert _live_bytes() - base >= 2 * state_bytes
    ck.close()
    del again, state, frozen


def test_restore_lora_state_into_abstract(tmp_path):
    model = random_model(Qwen25VLConfig.preset("tiny"))
    lora = LoraConfig(rank=4)
    _, state, _, _ = init_train_state(model, OPT, "lora", lora, seed=1)
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    ck.save_now(2, state, b"", {})
    _, abstract, _, _ = abstract_train_state(model, OPT, "lora", lora, seed=1)
    restored = ck.restore_latest(abstract)
    ck.close()
    _same_trees(restored.state, state)
    step, _, data, config = restored  # unpacks like the tuple it replaced
    assert (step, data, config) == (2, b"", {})


def test_sharded_restore_on_8_devices(tmp_path):
    """On a 2x2x2 mesh the abstract state carries the step's shardings and the restore lands in them."""
    script = textwrap.dedent(
        """
        import sys
        import jax
        import numpy as np
        from qwenvl_jax import sharding as shd
        from qwenvl_jax.config import Qwen25VLConfig
        from qwenvl_jax.loading import random_model
        from qwenvl_jax.train.checkpoints import TrainCheckpointer
        from qwenvl_jax.train.lora import LoraConfig
        from qwenvl_jax.train.optim import OptimConfig
        from qwenvl_jax.train.state import abstract_train_state, init_train_state, param_logical_axes
        from qwenvl_jax.train.step import state_shardings

        mesh = shd.make_mesh(2, 2, 2)
        for mode, lora in (("full", None), ("lora", LoraConfig(rank=4))):
            model = shd.shard_model(random_model(Qwen25VLConfig.preset("tiny")), mesh)
            _, state, _, tx = init_train_state(model, OptimConfig(), mode, lora)
            want = state_shardings(state, tx, param_logical_axes(model), mesh, lora=lora is not None)
            ck = TrainCheckpointer(f"{sys.argv[1]}/{mode}", async_save=False)
            ck.save_now(1, state, b"", {})
            _, abstract, _, _ = abstract_train_state(model, OptimConfig(), mode, lora)
            restored = ck.restore_latest(abstract).state
            ck.close()
            split = 0
            for a, w, r, s in zip(*map(jax.tree.leaves, (abstract, want, restored, state)), strict=True):
                assert a.sharding == w, (mode, a, w)
                assert r.sharding.is_equivalent_to(w, r.ndim), (mode, r.sharding, w)
                np.testing.assert_array_equal(np.asarray(r), np.asarray(s))
                split += len(r.sharding.device_set) == 8 and not r.sharding.is_fully_replicated
            assert split > 0, mode
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr[-4000:]


# -------------------------------------------------------------------------------- damaged steps


def state_at(k: int) -> TrainState:
    # A random (incompressible) 64x64 leaf: larger than OCDBT's inline limit, so it has a data file.
    w = jnp.asarray(np.random.default_rng(k).normal(size=(64, 64)), jnp.float32)
    params = {"w": w, "b": {"x": jnp.arange(4.0) * k}}
    return TrainState(jnp.int32(k), params, TX.init(params), jnp.array([k, 7], jnp.uint32))


def _data_file(step_dir: Path) -> Path:
    """The array data file (the largest file of `state/`'s OCDBT `d/` dirs)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _btree_node(step_dir: Path) -> Path:
    (node,) = (step_dir / "state" / "d").iterdir()
    return node


def _truncate(path: Path) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _remove(path: Path) -> Path:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    else:
        path.unlink()
    return path


# name -> damage(step dir) returning the damaged path, and the word the reason must say about it.
DAMAGE = {
    "missing data file": (lambda d: _remove(_data_file(d)), "missing"),
    "truncated data file": (lambda d: _truncate(_data_file(d)), "truncated"),
    "missing b-tree node": (lambda d: _remove(_btree_node(d)), "missing"),
    "missing manifest": (lambda d: _remove(d / "state" / "manifest.ocdbt"), "missing"),
    "truncated manifest": (lambda d: _truncate(d / "state" / "manifest.ocdbt"), "corrupt"),
    "missing _METADATA": (lambda d: _remove(d / "state" / "_METADATA"), "missing"),
    "truncated _METADATA": (lambda d: _truncate(d / "state" / "_METADATA"), "corrupt"),
    "missing data item": (lambda d: _remove(d / "data" / "metadata"), "missing"),
    "truncated config item": (lambda d: _truncate(d / "config" / "metadata"), "corrupt"),
    "missing state item": (lambda d: _remove(d / "state"), "missing"),
}


def _save_steps(directory: Path, steps=(1, 2), keep: int = 5) -> None:
    ck = TrainCheckpointer(directory, save_every=1, keep=keep, async_save=False)
    for k in steps:
        assert ck.save(k, state_at(k), f"data{k}".encode(), {"k": k})
    ck.close()


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_step_falls_back_and_is_kept(tmp_path, capfd, kind):
    ck_dir = tmp_path / "ck"
    _save_steps(ck_dir)
    damage, word = DAMAGE[kind]
    damaged = damage(ck_dir / "2")
    files = _files(ck_dir / "2")
    capfd.readouterr()

    ck = TrainCheckpointer(ck_dir, save_every=1, keep=2, async_save=False)
    restored = ck.restore_latest(state_at(0))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert (restored.step, restored.data_state, restored.config) == (1, b"data1", {"k": 1})
    _same_trees(restored.state, state_at(1))
    ((step, reason),) = restored.skipped
    assert step == 2 and "\n" not in reason
    assert f"{damaged}: {word}" in reason, reason
    # Kept, untouched, out of Orbax's numbering: the run saves step 2 afresh, and the rotation of
    # `keep=2` removes old steps but never the damaged dir.
    kept = ck_dir / "2.damaged"
    assert str(kept) in reason
    assert _files(kept) == files
    assert ck.manager.all_steps() == [1]
    for k in (2, 3, 4):
        assert ck.save(k, state_at(k), f"data{k}".encode(), {"k": k})
    ck.close()
    assert sorted(os.listdir(ck_dir)) == ["2.damaged", "3", "4"]
    assert _files(kept) == files
    ck = TrainCheckpointer(ck_dir, async_save=False)
    again = ck.restore_latest(state_at(0))
    ck.close()
    assert (again.step, again.skipped) == (4, [])


@pytest.mark.parametrize("name", ["missing", "truncated"])
def test_step_without_checkpoint_metadata_still_restores(tmp_path, name):
    """`_CHECKPOINT_METADATA` (timestamps, handler names) is not needed to restore a step: the step loads."""
    ck_dir = tmp_path / "ck"
    _save_steps(ck_dir)
    path = ck_dir / "2" / "_CHECKPOINT_METADATA"
    _remove(path) if name == "missing" else _truncate(path)
    ck = TrainCheckpointer(ck_dir, save_every=1, keep=2, async_save=False)
    restored = ck.restore_latest(state_at(0))
    assert (restored.step, restored.skipped) == (2, [])
    _same_trees(restored.state, state_at(2))
    assert ck.save(3, state_at(3), b"", {})
    ck.close()
    assert sorted(os.listdir(ck_dir)) == ["2", "3"]


def test_no_loadable_step_names_every_step_and_moves_nothing(tmp_path):
    ck_dir = tmp_path / "ck"
    _save_steps(ck_dir)
    missing = _remove(_data_file(ck_dir / "2"))
    truncated = _truncate(ck_dir / "1" / "state" / "_METADATA")
    ck = TrainCheckpointer(ck_dir, async_save=False)
    with pytest.raises(CheckpointError) as err:
        ck.restore_latest(state_at(0))
    ck.close()
    lines = str(err.value).splitlines()
    assert lines[0] == f"{ck_dir}: no checkpoint step can be restored:"
    assert lines[1].startswith(f"  step 2: {missing}: missing")
    assert lines[2].startswith(f"  step 1: {truncated}: corrupt")
    assert sorted(os.listdir(ck_dir)) == ["1", "2"]


def test_a_structure_mismatch_is_reported_not_a_traceback(tmp_path):
    _save_steps(tmp_path / "ck", steps=(1,))
    ck = TrainCheckpointer(tmp_path / "ck", async_save=False)
    other = TrainState(
        jnp.int32(0), {"v": jnp.zeros(3)}, TX.init({"v": jnp.zeros(3)}), jnp.zeros(2, jnp.uint32)
    )
    with pytest.raises(CheckpointError, match=r"step 1: .*/ck/1: cannot be restored \("):
        ck.restore_latest(other)
    ck.close()
    assert os.listdir(tmp_path / "ck") == ["1"]


def test_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = TrainCheckpointer("runs/ck", save_every=1, async_save=False)
    assert ck.directory == tmp_path / "runs" / "ck"
    ck.save_now(1, state_at(1), b"x", {})
    ck.close()
    ck = TrainCheckpointer(Path("runs") / "ck", async_save=False)
    restored = ck.restore_latest(state_at(0))
    ck.close()
    assert restored.step == 1
    _same_trees(restored.state, state_at(1))
