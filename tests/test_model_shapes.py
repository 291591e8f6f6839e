"""Full-size models built abstractly (`nnx.eval_shape`, no allocation): parameter counts equal HF's, and the
parameter tree honours the contract the weight loader is written against (paths, shapes, logical axes)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model import Qwen25VL

SIZES = ["3B", "7B", "32B", "72B"]
AXIS_NAMES = {
    "layers", "vocab", "embed", "mlp", "heads", "kv_heads", "norm",
    "vision_embed", "vision_mlp", "vision_qkv", "vision_patch", "merger",
}  # fmt: skip


def abstract_params(config: Qwen25VLConfig) -> dict[str, nnx.Param]:
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    return {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_param_count(name: str) -> int:
    """transformers' own count on the meta device; `parameters()` yields a tied weight once."""
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(**Qwen25VLConfig.preset(name).to_hf_dict())
        )
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", SIZES)
def test_param_count_equals_hf(name):
    params = abstract_params(Qwen25VLConfig.preset(name))
    ours = sum(int(np.prod(v.shape)) for v in params.values())
    assert ours == hf_param_count(name)
    if name == "3B":
        assert ours == 3_754_622_976  # spec 1.1, tied lm_head counted once


@pytest.mark.parametrize("name", [*SIZES, "tiny"])
def test_every_param_names_its_logical_axes(name):
    for path, var in abstract_params(Qwen25VLConfig.preset(name)).items():
        axes = var.get_metadata().get("logical_axes")
        assert isinstance(axes, tuple) and len(axes) == len(var.shape), (path, axes, var.shape)
        assert set(axes) <= AXIS_NAMES, (path, axes)
        assert (axes[0] == "layers") == ("/blocks/" in path or "/layers/" in path), (path, axes)
        assert var.dtype == np.float32  # param_dtype; the compute dtype is bf16


def test_tree_contract_3b_tied_and_7b_untied():
    """The exact paths and shapes of the parameter-tree contract (stacked layers, 2-D kernels)."""
    p3 = {k: v.shape for k, v in abstract_params(Qwen25VLConfig.preset("3B")).items()}
    assert not any(k.startswith("lm_head") for k in p3)  # tied: logits = h @ embedding.T
    dv, iv, h, inter, v, lv, lt = 1280, 3420, 2048, 11008, 151936, 32, 36
    expected = {
        "visual/patch_embed/kernel": (1176, dv),
        "visual/blocks/norm1/scale": (lv, dv),
        "visual/blocks/norm2/scale": (lv, dv),
        "visual/blocks/attn/qkv/kernel": (lv, dv, 3 * dv),
        "visual/blocks/attn/qkv/bias": (lv, 3 * dv),
        "visual/blocks/attn/proj/kernel": (lv, dv, dv),
        "visual/blocks/attn/proj/bias": (lv, dv),
        "visual/blocks/mlp/gate_proj/kernel": (lv, dv, iv),
        "visual/blocks/mlp/gate_proj/bias": (lv, iv),
        "visual/blocks/mlp/up_proj/kernel": (lv, dv, iv),
        "visual/blocks/mlp/up_proj/bias": (lv, iv),
        "visual/blocks/mlp/down_proj/kernel": (lv, iv, dv),
        "visual/blocks/mlp/down_proj/bias": (lv, dv),
        "visual/merger/ln_q/scale": (dv,),
        "visual/merger/fc1/kernel": (4 * dv, 4 * dv),
        "visual/merger/fc1/bias": (4 * dv,),
        "visual/merger/fc2/kernel": (4 * dv, h),
        "visual/merger/fc2/bias": (h,),
        "text/embed_tokens/embedding": (v, h),
        "text/layers/input_layernorm/scale": (lt, h),
        "text/layers/post_attention_layernorm/scale": (lt, h),
        "text/layers/self_attn/q_proj/kernel": (lt, h, h),
        "text/layers/self_attn/q_proj/bias": (lt, h),
        "text/layers/self_attn/k_proj/kernel": (lt, h, 256),
        "text/layers/self_attn/k_proj/bias": (lt, 256),
        "text/layers/self_attn/v_proj/kernel": (lt, h, 256),
        "text/layers/self_attn/v_proj/bias": (lt, 256),
        "text/layers/self_attn/o_proj/kernel": (lt, h, h),
        "text/layers/mlp/gate_proj/kernel": (lt, h, inter),
        "text/layers/mlp/up_proj/kernel": (lt, h, inter),
        "text/layers/mlp/down_proj/kernel": (lt, inter, h),
        "text/norm/scale": (h,),
    }
    assert p3 == expected
    p7 = abstract_params(Qwen25VLConfig.preset("7B"))
    assert p7["lm_head/kernel"].shape == (3584, 152064)
    assert p7["lm_head/kernel"].get_metadata()["logical_axes"] == ("embed", "vocab")
    assert p7["text/layers/self_attn/k_proj/kernel"].shape == (28, 3584, 512)


def test_scan_layers_false_keeps_the_same_tree():
    config = Qwen25VLConfig.preset("tiny")
    scanned = {k: v.shape for k, v in abstract_params(config).items()}
    assert scanned == {k: v.shape for k, v in abstract_params(config.replace(scan_layers=False)).items()}


def test_model_package_imports_neither_torch_nor_pil():
    """Device side: the model never imports torch, transformers or PIL (host bookkeeping is imported lazily)."""
    code = "import sys, qwenvl_jax.model; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "flax" in loaded and not loaded & {"torch", "transformers", "PIL"}
