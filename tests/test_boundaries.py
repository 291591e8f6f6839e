"""The doors that must stay shut: the host pipeline never imports jax or torch; the runtime never torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import qwenvl_jax.processing",
        "from qwenvl_jax.processing import Processor, collate",
        "import qwenvl_jax.tiny",
        "import qwenvl_jax.cli",
    ],
)
def test_host_side_imports_neither_jax_nor_torch(statement):
    loaded = _imported_after(statement)
    assert not loaded & {"jax", "jaxlib", "torch", "transformers", "flax"}, loaded & {
        "jax",
        "torch",
        "transformers",
    }


def test_processor_demo_runs_offline():
    out = subprocess.run(
        [sys.executable, "-m", "qwenvl_jax.cli", "demo", "--processor"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "static-shape batch:" in out.stdout and "rope_deltas" in out.stdout
    assert "row 0 labels decode to: 'A red circle on a white background.<|im_end|>\\n'" in out.stdout
