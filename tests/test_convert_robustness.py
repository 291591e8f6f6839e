"""convert / export / load on damaged inputs, relative paths, overlapping dirs and `overwrite`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import qwenvl_jax
from conversion.convert import convert, export
from qwenvl_jax.checkpoint import CheckpointError, load_params, save_params
from qwenvl_jax.tiny import write_tiny_model
from qwenvl_jax.weights import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, atomic_directory, hf_to_params

PROCESSOR = ["chat_template.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
    return convert(hf_dir, tmp_path_factory.mktemp("orbax") / "ckpt")


@pytest.fixture(scope="module")
def sharded_dir(orbax_dir, tmp_path_factory):
    out = export(orbax_dir, tmp_path_factory.mktemp("sharded") / "hf", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    return out


def _copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    return Path(shutil.copytree(src, tmp_path / name, symlinks=True))


def _truncate(path: Path, size: int | None = None) -> Path:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)
    return path


def _one_line_error(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def _siblings(path: Path) -> list[str]:
    """Temporary or trash dirs left next to `path` (there should be none)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# ------------------------------------------------------------------------------------- damaged HF dir


def _garbage_header(d: Path) -> Path:
    path = d / SAFE_WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\xff{garbage" + data[8 + 9 :])  # same length, not JSON
    return path


HF_DAMAGE = {
    "truncated safetensors": (lambda d: _truncate(d / SAFE_WEIGHTS_NAME), "truncated"),
    "safetensors cut in its header": (lambda d: _truncate(d / SAFE_WEIGHTS_NAME, 100), "truncated"),
    "garbage header": (_garbage_header, "corrupt safetensors header"),
    "missing config.json": (lambda d: (d / "config.json").unlink() or d / "config.json", "missing"),
    "corrupt config.json": (
        lambda d: (d / "config.json").write_text('{"text_config": ') and d / "config.json",
        "corrupt, not JSON",
    ),
    "invalid config.json": (
        lambda d: (d / "config.json").write_text('{"text_config": 3}') and d / "config.json",
        "not a Qwen2.5-VL config",
    ),
}


@pytest.mark.parametrize("kind", list(HF_DAMAGE))
def test_damaged_hf_dir_is_one_line_naming_the_file(hf_dir, tmp_path, kind):
    src = _copy(hf_dir, tmp_path)
    damage, words = HF_DAMAGE[kind]
    path = damage(src)
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "out")
    assert words in _one_line_error(err, path)
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []
    if kind == "missing config.json":  # then `load` does not take the dir for an HF checkpoint at all
        with pytest.raises(FileNotFoundError, match="neither an HF checkpoint"):
            qwenvl_jax.load(src)
        return
    with pytest.raises(CheckpointError) as err:
        qwenvl_jax.load(src)
    assert words in _one_line_error(err, path)


def test_missing_shard_names_index_and_shard(sharded_dir, tmp_path):
    src = _copy(sharded_dir, tmp_path)
    shard = sorted(src.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    for call in (lambda: convert(src, tmp_path / "out"), lambda: qwenvl_jax.load(src)):
        with pytest.raises(CheckpointError) as err:
            call()
        message = _one_line_error(err, src / SAFE_WEIGHTS_INDEX_NAME)
        assert f"missing: {shard.name}" in message
    assert not (tmp_path / "out").exists()


def test_corrupt_index(sharded_dir, tmp_path):
    src = _copy(sharded_dir, tmp_path)
    _truncate(src / SAFE_WEIGHTS_INDEX_NAME)
    with pytest.raises(CheckpointError) as err:
        convert(src, tmp_path / "out")
    assert "corrupt index" in _one_line_error(err, src / SAFE_WEIGHTS_INDEX_NAME)


# ---------------------------------------------------------------------------------- damaged Orbax dir


def _data_file(ckpt: Path) -> Path:
    files = [p for p in (ckpt / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


ORBAX_DAMAGE = {
    "missing data file": (lambda c: _unlink(_data_file(c)), "missing"),
    "truncated data file": (lambda c: _truncate(_data_file(c)), "truncated"),
    "missing manifest": (lambda c: _unlink(c / "params" / "manifest.ocdbt"), "missing"),
    "missing _METADATA": (lambda c: _unlink(c / "params" / "_METADATA"), "missing"),
    "truncated _METADATA": (lambda c: _truncate(c / "params" / "_METADATA"), "corrupt"),
    "missing config.json": (lambda c: _unlink(c / "config.json"), "missing"),
    "corrupt config.json": (lambda c: _truncate(c / "config.json"), "corrupt"),
}


def _unlink(path: Path) -> Path:
    path.unlink()
    return path


@pytest.mark.parametrize("kind", list(ORBAX_DAMAGE))
def test_damaged_orbax_dir_is_one_line_naming_the_file(orbax_dir, tmp_path, kind):
    ckpt = _copy(orbax_dir, tmp_path)
    damage, words = ORBAX_DAMAGE[kind]
    path = damage(ckpt)
    with pytest.raises(CheckpointError) as err:
        export(ckpt, tmp_path / "out")
    assert f"{path}: {words}" in _one_line_error(err, path)
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []
    with pytest.raises(CheckpointError) as err:
        qwenvl_jax.load(ckpt)
    assert f"{path}: {words}" in _one_line_error(err, path)


def test_export_warns_about_missing_processor_files(orbax_dir, tmp_path, capsys):
    ckpt = _copy(orbax_dir, tmp_path)
    export(ckpt, tmp_path / "complete")
    assert "warning" not in capsys.readouterr().err
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "preprocessor_config.json").unlink()
    out = export(ckpt, tmp_path / "out")
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("warning:")]
    assert f"{ckpt} has no tokenizer.json, preprocessor_config.json" in line
    assert (out / SAFE_WEIGHTS_NAME).is_file() and (out / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------- relative paths


def test_relative_paths(hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf_dir, "hf")
    out = convert("hf", "orbax")
    assert out == tmp_path / "orbax"
    params, config = load_params("orbax")
    model = qwenvl_jax.load("orbax", dtype="float32")
    assert model.config.text.hidden_size == config.text.hidden_size
    assert qwenvl_jax.load("hf", dtype="float32").config.text == model.config.text
    assert export("orbax", "exported") == tmp_path / "exported"
    np.testing.assert_array_equal(
        hf_to_params("exported", config)["text/norm/scale"], params["text/norm/scale"]
    )
    assert save_params(params, "saved", config) == tmp_path / "saved"
    again, _ = load_params(Path("saved"))
    np.testing.assert_array_equal(again["text/norm/scale"], params["text/norm/scale"])
    monkeypatch.setenv("HOME", str(tmp_path))
    assert export("~/orbax", "~/home_export") == tmp_path / "home_export"


# ------------------------------------------------------------------------------ overlap and overwrite


def test_output_may_not_overlap_the_source(hf_dir, orbax_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "a", "hf")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    ckpt = _copy(orbax_dir, tmp_path, "ckpt")
    (tmp_path / "link").symlink_to(ckpt)
    cases = [
        (convert, src, src, "is the source"),
        (convert, src, src / "sub", "inside the source"),
        (convert, src, tmp_path / "a", "contains the source"),
        (export, ckpt, ckpt, "is the source"),
        (export, ckpt, tmp_path / "link", "is the source"),
        (export, tmp_path / "link", ckpt / "hf", "inside the source"),
    ]
    for fn, source, target, words in cases:
        with pytest.raises(CheckpointError, match=words):
            fn(source, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert sorted(os.listdir(tmp_path / "a")) == ["hf"]
    load_params(ckpt)  # intact


def test_convert_overwrite_keeps_unrelated_files(hf_dir, tmp_path):
    out = tmp_path / "out"
    other = write_tiny_model(tmp_path / "other", seed=7)
    convert(other, out)
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")
    with pytest.raises(FileExistsError):
        convert(hf_dir, out)
    convert(hf_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "scores.json").is_file()
    assert sorted(os.listdir(out)) == sorted([*PROCESSOR, "config.json", "eval", "notes.txt", "params"])
    params, config = load_params(out)
    want = hf_to_params(hf_dir, config)
    assert params.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(params[k], want[k])
    assert _siblings(out) == []


def test_export_overwrite_replaces_only_its_outputs(orbax_dir, tmp_path):
    out = tmp_path / "out"
    export(orbax_dir, out, max_shard_bytes=200_000)
    (out / "notes.txt").write_text("mine")
    (out / "adapter_model.safetensors").write_bytes(b"not ours")
    sharded = sorted(out.glob("model-*-of-*.safetensors"))
    assert sharded and (out / SAFE_WEIGHTS_INDEX_NAME).is_file()
    with pytest.raises(FileExistsError):
        export(orbax_dir, out)
    # One file now: the old shards and their index go (else they would shadow or confuse the new one).
    export(orbax_dir, out, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(
        [*PROCESSOR, "adapter_model.safetensors", "config.json", "notes.txt", SAFE_WEIGHTS_NAME]
    )
    params, config = load_params(orbax_dir)
    np.testing.assert_array_equal(hf_to_params(out, config)["text/norm/scale"], params["text/norm/scale"])
    # Sharded again: the single file goes, since transformers would load it instead of the shards.
    export(orbax_dir, out, max_shard_bytes=200_000, overwrite=True)
    assert not (out / SAFE_WEIGHTS_NAME).exists()
    assert sorted(out.glob("model-*-of-*.safetensors")) == sharded
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "adapter_model.safetensors").read_bytes() == b"not ours"
    np.testing.assert_array_equal(hf_to_params(out, config)["text/norm/scale"], params["text/norm/scale"])
    assert _siblings(out) == []


def test_atomic_directory_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old" and _siblings(target) == []
    with atomic_directory(target, overwrite=True, replaces=("*.bin",)) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "sub").mkdir()
    assert sorted(os.listdir(target)) == ["config.json", "keep.txt", "sub"]
    assert (target / "config.json").read_text() == "new" and _siblings(target) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:  # an existing empty dir is not refused
        (tmp / "a").write_text("a")
    assert os.listdir(empty) == ["a"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
