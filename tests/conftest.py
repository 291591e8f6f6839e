"""Shared fixtures: offline HF checkpoint dirs (spec 7) and the HF reference processors."""

from __future__ import annotations

import pytest

from conversion import tiny_hf


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Processor files of an HF Qwen2.5-VL dir with the 342-token tiny tokenizer."""
    return tiny_hf.save_checkpoint_dir(
        tmp_path_factory.mktemp("tiny_ckpt"), preprocessor={"max_pixels": 28 * 28 * 64}
    )


@pytest.fixture(scope="session")
def real_ckpt(tmp_path_factory):
    """Processor files of an HF Qwen2.5-VL dir with the real Qwen2.5 vocabulary and Hub pixel limits."""
    return tiny_hf.save_checkpoint_dir(tmp_path_factory.mktemp("real_ckpt"), real_tokenizer=True)


@pytest.fixture(scope="session")
def hf_tiny(tiny_ckpt):
    return tiny_hf.hf_processor(tiny_ckpt)


@pytest.fixture(scope="session")
def hf_real(real_ckpt):
    return tiny_hf.hf_processor(real_ckpt)


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def tiny_model_dir(request, tmp_path_factory):
    """A complete tiny random HF Qwen2.5-VL checkpoint (spec 7), untied and tied (no lm_head.weight)."""
    return tiny_hf.save_tiny_model_dir(
        tmp_path_factory.mktemp("tiny_model"), tie_word_embeddings=request.param, seed=1 + request.param
    )
