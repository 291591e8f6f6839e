"""Shared fixtures: offline HF checkpoint dirs (spec 7) and the HF reference processors."""

from __future__ import annotations

import os
import shutil
import tempfile

# The processes the tests start (CLI runs, demos, a run killed and resumed) share one persistent
# compilation cache, so a program compiles once per suite instead of once per process start: about a
# quarter off the run tests. Set before jax is imported, so every child inherits it; this process keeps
# its in-memory caches only (its executables are inspected for cost and memory, which a deserialised one
# need not carry).
_CACHE_DIR = tempfile.mkdtemp(prefix="qwenvl-jax-tests-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from conversion import tiny_hf  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


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


@pytest.fixture
def highest_precision():
    """float32 matmuls at full precision, for parity against PyTorch; a module opts in with
    `pytestmark = pytest.mark.usefixtures("highest_precision")`."""
    with jax.default_matmul_precision("highest"):
        yield
