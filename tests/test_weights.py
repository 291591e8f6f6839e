"""HF safetensors <-> native params <-> Orbax: reader, key map, round trips, errors and atomicity.

torch, safetensors and transformers appear here only as references; the code under test uses numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conversion import tiny_hf
from conversion.convert import convert, export
from qwenvl_jax import checkpoint
from qwenvl_jax.checkpoint import load_params, save_params
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.weights import (
    CheckpointMismatchError,
    SafetensorsFile,
    hf_to_params,
    iter_hf_tensors,
    key_map,
    load_safetensors,
    params_to_hf,
    save_safetensors,
    write_hf_checkpoint,
)

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

BF16 = np.dtype(ml_dtypes.bfloat16)
REPO = Path(__file__).resolve().parents[1]

# The parameter-tree contract with the Flax model, for the tiny config (Dv=32, Iv=48, Lv=4, H=64, I=128,
# L=2, V=384, 4 heads of 16, 2 kv heads), written out by hand rather than derived from the key map.
TINY_CONTRACT = {
    "visual/patch_embed/kernel": (1176, 32),
    "visual/blocks/norm1/scale": (4, 32),
    "visual/blocks/norm2/scale": (4, 32),
    "visual/blocks/attn/qkv/kernel": (4, 32, 96),
    "visual/blocks/attn/qkv/bias": (4, 96),
    "visual/blocks/attn/proj/kernel": (4, 32, 32),
    "visual/blocks/attn/proj/bias": (4, 32),
    "visual/blocks/mlp/gate_proj/kernel": (4, 32, 48),
    "visual/blocks/mlp/gate_proj/bias": (4, 48),
    "visual/blocks/mlp/up_proj/kernel": (4, 32, 48),
    "visual/blocks/mlp/up_proj/bias": (4, 48),
    "visual/blocks/mlp/down_proj/kernel": (4, 48, 32),
    "visual/blocks/mlp/down_proj/bias": (4, 32),
    "visual/merger/ln_q/scale": (32,),
    "visual/merger/fc1/kernel": (128, 128),
    "visual/merger/fc1/bias": (128,),
    "visual/merger/fc2/kernel": (128, 64),
    "visual/merger/fc2/bias": (64,),
    "text/embed_tokens/embedding": (384, 64),
    "text/layers/input_layernorm/scale": (2, 64),
    "text/layers/post_attention_layernorm/scale": (2, 64),
    "text/layers/self_attn/q_proj/kernel": (2, 64, 64),
    "text/layers/self_attn/q_proj/bias": (2, 64),
    "text/layers/self_attn/k_proj/kernel": (2, 64, 32),
    "text/layers/self_attn/k_proj/bias": (2, 32),
    "text/layers/self_attn/v_proj/kernel": (2, 64, 32),
    "text/layers/self_attn/v_proj/bias": (2, 32),
    "text/layers/self_attn/o_proj/kernel": (2, 64, 64),
    "text/layers/mlp/gate_proj/kernel": (2, 64, 128),
    "text/layers/mlp/up_proj/kernel": (2, 64, 128),
    "text/layers/mlp/down_proj/kernel": (2, 128, 64),
    "text/norm/scale": (64,),
    "lm_head/kernel": (64, 384),
}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny HF dirs: untied f32, tied f32, untied bf16, and an untied f32 copy sharded at 20 KB."""
    root = tmp_path_factory.mktemp("hf")
    out = {
        "f32": tiny_hf.save_tiny_model_dir(root / "f32"),
        "tied": tiny_hf.save_tiny_model_dir(root / "tied", tie_word_embeddings=True),
    }
    model = tiny_hf.build_tiny_model()
    out["bf16"] = root / "bf16"
    for name in os.listdir(out["f32"]):
        if not name.endswith(".safetensors") and name != "config.json":
            out["bf16"].mkdir(exist_ok=True)
            shutil.copy(out["f32"] / name, out["bf16"] / name)
    model.to(torch.bfloat16).save_pretrained(out["bf16"])
    out["sharded"] = root / "sharded"
    tiny_hf.build_tiny_model().save_pretrained(out["sharded"], max_shard_size="20KB")
    return out


def _config(d) -> Qwen25VLConfig:
    return Qwen25VLConfig.from_pretrained(d)


def _tensors(d) -> dict[str, np.ndarray]:
    return load_safetensors(Path(d) / "model.safetensors")


def _same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def _write_hf_dir(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_safetensors(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------- reader


def test_reader_matches_safetensors_numpy(dirs):
    path = dirs["f32"] / "model.safetensors"
    ours, ref = load_safetensors(path), safetensors_numpy.load_file(path)
    assert len(ours) == 81
    _same_bytes(ours, ref)
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    view = f.get("model.embed_tokens.weight")
    assert not view.flags.writeable and not view.flags.owndata  # a view into the memory map


def test_reader_bf16_matches_torch(dirs):
    path = dirs["bf16"] / "model.safetensors"
    ref = safetensors_torch.load_file(path)
    ours = load_safetensors(path)
    assert sorted(ours) == sorted(ref)
    for k, t in ref.items():
        assert t.dtype == torch.bfloat16 and ours[k].dtype == BF16
        np.testing.assert_array_equal(ours[k].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(ours[k].astype(np.float32), t.float().numpy())


def test_all_dtypes_and_writer_is_byte_identical_to_rust(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    tensors = {
        "f32": x,
        "f64": x.double(),
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "f8e4m3": x.to(torch.float8_e4m3fn),
        "f8e5m2": x.to(torch.float8_e5m2),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    ref_bytes = safetensors_torch.save(tensors, metadata={"format": "pt"})
    (tmp_path / "ref.safetensors").write_bytes(ref_bytes)
    ours = load_safetensors(tmp_path / "ref.safetensors")
    for k, t in tensors.items():
        got = ours[k]
        assert got.shape == tuple(t.shape), k
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy(), err_msg=k)
        else:
            np.testing.assert_array_equal(got, t.numpy(), err_msg=k)
    # Our writer reproduces the Rust writer's header, tensor order and padding byte for byte.
    save_safetensors(ours, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == ref_bytes


def test_sharded_index(dirs, tmp_path):
    sharded, single = dirs["sharded"], dirs["f32"]
    assert (sharded / "model.safetensors.index.json").is_file() and not (
        sharded / "model.safetensors"
    ).exists()
    streamed = dict(iter_hf_tensors(sharded))
    assert len(streamed) == 81
    _same_bytes({k: np.array(v) for k, v in streamed.items()}, _tensors(single))
    # Writing: sharded output with an HF-style index, read back identically.
    cfg = _config(single)
    params = hf_to_params(sharded, cfg)
    write_hf_checkpoint(params, cfg, tmp_path / "out", dtype=None, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(single).values())
    _same_bytes({k: np.array(v) for k, v in iter_hf_tensors(tmp_path / "out")}, _tensors(single))


# ------------------------------------------------------------------------------------------- key map


@pytest.mark.parametrize("kind", ["f32", "tied", "bf16"])
def test_key_map_round_trip(dirs, kind):
    cfg = _config(dirs[kind])
    params = hf_to_params(dirs[kind], cfg)
    contract = dict(TINY_CONTRACT)
    if kind == "tied":
        del contract["lm_head/kernel"]
    assert {k: v.shape for k, v in params.items()} == contract
    assert all(v.flags.c_contiguous and v.flags.owndata for v in params.values())
    back = params_to_hf(params, cfg)
    assert len(back) == (80 if kind == "tied" else 81)
    _same_bytes(back, _tensors(dirs[kind]))


def test_key_map_semantics_match_torch_modules(dirs):
    """The transforms compute what the torch modules compute: Conv3d patch embed, Linear, stacking."""
    model = tiny_hf.build_tiny_model()
    params = hf_to_params(dirs["f32"], _config(dirs["f32"]))
    x = torch.randn(5, 1176, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.model.visual.patch_embed(x).numpy()
        blk = model.model.visual.blocks[2].attn.qkv
        h = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
        ref_qkv = blk(h).numpy()
        ref_head = model.lm_head(torch.randn(3, 64, generator=torch.Generator().manual_seed(3))).numpy()
    got = x.numpy().astype(np.float64) @ params["visual/patch_embed/kernel"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    got_qkv = (
        h.numpy() @ params["visual/blocks/attn/qkv/kernel"][2] + params["visual/blocks/attn/qkv/bias"][2]
    )
    np.testing.assert_allclose(got_qkv, ref_qkv, rtol=1e-5, atol=1e-5)
    y = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(y @ params["lm_head/kernel"], ref_head, rtol=1e-5, atol=1e-5)


def test_in_memory_names_and_dtype_cast(dirs):
    cfg = _config(dirs["f32"])
    ref = hf_to_params(dirs["f32"], cfg)
    renamed = []
    for k, v in _tensors(dirs["f32"]).items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        renamed.append((k, v))
    assert any(k.startswith("model.language_model.layers.") for k, _ in renamed)
    got = hf_to_params(iter(renamed), cfg)
    _same_bytes(got, ref)
    cast = hf_to_params(iter(renamed), cfg, dtype="bfloat16")
    assert all(v.dtype == BF16 for v in cast.values())
    np.testing.assert_array_equal(cast["text/norm/scale"], ref["text/norm/scale"].astype(BF16))
    # The same tensor under both naming schemes is an error, not a silent overwrite.
    with pytest.raises(CheckpointMismatchError, match="two naming schemes"):
        hf_to_params(iter([*renamed, ("model.norm.weight", ref["text/norm/scale"])]), cfg)


# ------------------------------------------------------------------------------------------- errors


def test_mismatch_lists_every_offending_key_and_writes_nothing(dirs, tmp_path):
    tensors = _tensors(dirs["f32"])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["visual.merger.ln_q.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    tensors["visual.blocks.0.attn.qkv.weight"] = tensors["visual.blocks.0.attn.qkv.weight"].T.copy()
    bad = _write_hf_dir(dirs["f32"], tmp_path / "bad", tensors)
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError) as err:
        convert(bad, out)
    e = err.value
    assert e.missing == ["model.layers.1.mlp.up_proj.weight", "visual.merger.ln_q.weight"]
    assert e.unexpected == ["model.layers.2.mlp.up_proj.weight"]
    assert e.wrong_shape == {"visual.blocks.0.attn.qkv.weight": ((96, 32), (32, 96))}
    msg = str(e)
    for key in ["model.layers.1.mlp.up_proj.weight", "visual.merger.ln_q.weight",
                "model.layers.2.mlp.up_proj.weight", "expected (96, 32), got (32, 96)"]:  # fmt: skip
        assert key in msg
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # The streaming path (no headers to pre-check) reports the same.
    with pytest.raises(CheckpointMismatchError) as err2:
        hf_to_params(iter(tensors.items()), _config(dirs["f32"]))
    assert (err2.value.missing, err2.value.unexpected, err2.value.wrong_shape) == (
        e.missing,
        e.unexpected,
        e.wrong_shape,
    )


def test_export_mismatch_writes_nothing(dirs, tmp_path):
    cfg = _config(dirs["f32"])
    params = hf_to_params(dirs["f32"], cfg)
    params.pop("text/norm/scale")
    params["text/layers/mlp/up_proj/kernel"] = params["text/layers/mlp/up_proj/kernel"][:1]
    with pytest.raises(CheckpointMismatchError) as err:
        write_hf_checkpoint(params, cfg, tmp_path / "out")
    assert err.value.missing == ["text/norm/scale"]
    assert err.value.wrong_shape == {"text/layers/mlp/up_proj/kernel": ((2, 64, 128), (1, 64, 128))}
    assert not list(tmp_path.iterdir())


def test_tied_config_with_lm_head(dirs, tmp_path):
    tensors = _tensors(dirs["tied"])
    cfg = _config(dirs["tied"])
    equal = _write_hf_dir(
        dirs["tied"], tmp_path / "eq", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}
    )
    _same_bytes(hf_to_params(equal, cfg), hf_to_params(dirs["tied"], cfg))
    head = tensors["model.embed_tokens.weight"] + 1
    differ = _write_hf_dir(dirs["tied"], tmp_path / "ne", {**tensors, "lm_head.weight": head})
    with pytest.raises(CheckpointMismatchError, match="differs from the embedding"):
        hf_to_params(differ, cfg)
    with pytest.raises(CheckpointMismatchError) as err:  # an untied config needs its head
        hf_to_params(dirs["tied"], _config(dirs["f32"]))
    assert err.value.missing == ["lm_head.weight"]


# ------------------------------------------------------------------------------------------- Orbax


@pytest.mark.parametrize("kind", ["f32", "bf16", "tied"])
def test_convert_export_bit_exact(dirs, tmp_path, kind):
    src = dirs[kind]
    convert(src, tmp_path / "ckpt")
    params, cfg = load_params(tmp_path / "ckpt")
    assert cfg == _config(src)
    assert {v.dtype for v in params.values()} == {BF16 if kind == "bf16" else np.dtype(np.float32)}
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(
        [n for n in os.listdir(src) if not n.endswith(".safetensors")] + ["params"]
    )
    export(tmp_path / "ckpt", tmp_path / "hf")
    # Same keys, dtypes and bytes: the whole file is identical to what transformers wrote.
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"]:  # fmt: skip
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == (
        "bfloat16" if kind == "bf16" else "float32"
    )


def test_export_dtype_policy(dirs, tmp_path):
    # bf16 weights stored as f32 export back to bf16 bit-exactly (the recorded source dtype).
    convert(dirs["bf16"], tmp_path / "ckpt", dtype="float32")
    params, _ = load_params(tmp_path / "ckpt")
    assert {v.dtype for v in params.values()} == {np.dtype(np.float32)}
    export(tmp_path / "ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (
        dirs["bf16"] / "model.safetensors"
    ).read_bytes()
    # f32 params with no recorded source dtype (e.g. training output) export as bf16.
    cfg = _config(dirs["f32"])
    save_params(hf_to_params(dirs["f32"], cfg), tmp_path / "trained", cfg)
    export(tmp_path / "trained", tmp_path / "hf2")
    got = _tensors(tmp_path / "hf2")
    ref = _tensors(dirs["f32"])
    assert all(v.dtype == BF16 for v in got.values())
    np.testing.assert_array_equal(got["model.norm.weight"], ref["model.norm.weight"].astype(BF16))


@pytest.mark.parametrize("kind", ["f32", "tied"])
def test_exported_dir_loads_in_transformers_with_identical_logits(dirs, tmp_path, kind):
    from transformers import Qwen2_5_VLForConditionalGeneration

    convert(dirs[kind], tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    ids = torch.tensor([[320, 5, 6, 329] + [332] * 4 + [330, 7, 8, 9]])
    pixels = torch.randn(16, 1176, generator=torch.Generator().manual_seed(0))
    logits = []
    for d in (dirs[kind], tmp_path / "hf"):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager"
        )
        with torch.no_grad():
            logits.append(
                model.eval()(
                    input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]])
                ).logits
            )
    assert logits[0].abs().max() > 1
    assert torch.equal(logits[0], logits[1])


def test_save_params_nested_and_restore_into_sharded_target(dirs, tmp_path):
    import jax

    cfg = _config(dirs["f32"])
    flat = hf_to_params(dirs["f32"], cfg)
    nested = {"visual": {}, "text": {}, "lm_head": {}}
    for path, v in flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    # An `nnx.State` of `nnx.Param` leaves (what `nnx.state(model, nnx.Param)` returns) is accepted too.
    from flax import nnx

    state = nnx.State(jax.tree.map(nnx.Param, nested))
    _same_bytes(params_to_hf(state, cfg), _tensors(dirs["f32"]))
    save_params(nested, tmp_path / "ckpt", cfg)
    got, _ = load_params(tmp_path / "ckpt")
    _same_bytes(got, flat)
    with pytest.raises(FileExistsError):
        save_params(flat, tmp_path / "ckpt", cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, BF16, sharding=sharding) for k, v in flat.items()}
    restored, _ = load_params(tmp_path / "ckpt", target=target)
    for k, v in restored.items():
        assert isinstance(v, jax.Array) and v.sharding == sharding and v.dtype == BF16, k
        np.testing.assert_array_equal(np.asarray(v), flat[k].astype(BF16))


def test_crash_during_save_leaves_no_checkpoint(dirs, tmp_path, monkeypatch):
    cfg = _config(dirs["f32"])
    params = hf_to_params(dirs["f32"], cfg)
    real = checkpoint._checkpointer

    class Crashing:
        def save(self, path, args):
            real().save(path, args=args)  # the data is fully written ...
            raise OSError("simulated crash")  # ... but the checkpoint is never published

    monkeypatch.setattr(checkpoint, "_checkpointer", Crashing)
    target = tmp_path / "ckpt"
    with pytest.raises(OSError, match="simulated crash"):
        save_params(params, target, cfg, assets_from=dirs["f32"])
    assert not target.exists() and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        load_params(target)
    monkeypatch.setattr(checkpoint, "_checkpointer", real)
    save_params(params, target, cfg)
    _same_bytes(load_params(target)[0], params)


def test_killed_process_leaves_no_checkpoint(dirs, tmp_path):
    """SIGKILL a real process after Orbax has written everything but before the checkpoint is published."""
    target = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import sys, time
        from qwenvl_jax import checkpoint
        from qwenvl_jax.config import Qwen25VLConfig
        from qwenvl_jax.weights import hf_to_params
        real = checkpoint._checkpointer
        class Stall:
            def save(self, path, args):
                real().save(path, args=args)
                print("SAVED", flush=True)
                time.sleep(600)
        checkpoint._checkpointer = Stall
        cfg = Qwen25VLConfig.from_pretrained({str(dirs["f32"])!r})
        checkpoint.save_params(hf_to_params({str(dirs["f32"])!r}, cfg), {str(target)!r}, cfg)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, text=True
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == "SAVED"
            leftovers = list(tmp_path.glob(".ckpt.tmp-*"))
            assert len(leftovers) == 1 and (leftovers[0] / "params" / "commit_success.txt").exists()
        finally:
            proc.kill()
    assert not target.exists()
    with pytest.raises(FileNotFoundError):
        load_params(target)


def test_full_size_key_maps():
    """Spec 1.1/5.1: the 3B table has 390 vision + 434 text tensors and 3,754,622,976 parameters (tied)."""
    table = key_map(Qwen25VLConfig.preset("3B"))
    keys = [k for e in table for k in e.hf_keys()]
    assert len(keys) == len(set(keys)) == 390 + 434
    assert sum(int(np.prod(e.full_shape)) for e in table) == 3_754_622_976
    table_7b = {e.path: e for e in key_map(Qwen25VLConfig.preset("7B"))}
    assert table_7b["lm_head/kernel"].full_shape == (3584, 152064)
    assert table_7b["text/layers/self_attn/k_proj/kernel"].full_shape == (28, 3584, 512)
    assert table_7b["visual/merger/fc2/kernel"].full_shape == (5120, 3584)
