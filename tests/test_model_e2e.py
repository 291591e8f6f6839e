"""End to end on tiny random HF checkpoints: load -> logits equal transformers' on valid tokens (spec 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwenvl_jax
from conversion import parity
from qwenvl_jax.processing import BatchSpec, Processor, collate

pytestmark = pytest.mark.usefixtures("highest_precision")


ATOL = 1e-4  # spec 6: tiny model, float32, CPU, highest precision


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    processor = Processor.from_pretrained(tiny_model_dir)
    cases = parity.builtin_inputs(processor)
    with torch.no_grad():
        logits = [model(**parity._torch_inputs(b, torch.float32, "cpu")).logits.numpy() for _, b in cases]
    return processor, cases, logits


def _assert_close(ref, got, mask):
    mask = np.asarray(mask).astype(bool)
    diff = np.abs(np.asarray(got, np.float64)[mask] - np.asarray(ref, np.float64)[mask]).max()
    assert diff <= ATOL, diff
    assert (np.asarray(got)[mask].argmax(-1) == np.asarray(ref)[mask].argmax(-1)).all()


def test_processor_output_logits_equal_hf(tiny_model_dir, hf_reference):
    """Images with partial and all-padding windows, a left-padded batch, and a video with fractional
    seconds per grid step, through `model(**processor_output)`."""
    _, cases, ref = hf_reference
    model = qwenvl_jax.load(tiny_model_dir, dtype="float32")
    for (_, batch), r in zip(cases, ref, strict=True):
        got = model(**batch)
        assert got.shape == r.shape and got.dtype == np.float32
        _assert_close(r, got, batch["attention_mask"])


def test_collated_static_batch_equals_raw_path(tiny_model_dir, hf_reference):
    """The jittable static-shape path (collate keys) gives the same logits as HF on the real tokens."""
    processor, cases, ref = hf_reference
    model = qwenvl_jax.load(tiny_model_dir, dtype="float32")
    _, batch = cases[0]
    rows = []
    grids = iter(batch["image_grid_thw"])
    pixels = np.split(batch["pixel_values"], np.cumsum(batch["image_grid_thw"].prod(-1))[:-1])
    pix_iter = iter(pixels)
    for i in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][i][batch["attention_mask"][i].astype(bool)]
        n_images = int((np.diff(np.r_[0, ids == processor.image_token_id, 0]) == 1).sum())
        g = [next(grids) for _ in range(n_images)]
        p = [next(pix_iter) for _ in range(n_images)]
        rows.append({"input_ids": ids, "image_grid_thw": np.array(g), "pixel_values": np.concatenate(p)})
    spec = BatchSpec(
        batch_size=2, seq_buckets=(256,), image_patches=1024, max_images=4, padding_side="left",
        pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )  # fmt: skip
    collated = collate(rows, spec)
    got = np.asarray(model(**collated))
    width = batch["input_ids"].shape[1]
    _assert_close(ref[0], got[:, -width:], batch["attention_mask"])


def test_orbax_checkpoint_loads_to_the_same_logits(tiny_model_dir, hf_reference, tmp_path):
    from conversion.convert import convert

    _, cases, ref = hf_reference
    ckpt = convert(tiny_model_dir, tmp_path / "orbax")
    model = qwenvl_jax.load(ckpt, dtype="float32")
    _, batch = cases[1]
    _assert_close(ref[1], model(**batch), batch["attention_mask"])


def test_parity_harness_passes_its_own_gates(tiny_model_dir):
    import dataclasses

    results = parity.run(tiny_model_dir, verbose=False)
    assert parity.verdict(results) == []
    assert all(r.top1 == 1.0 and r.max_abs < 1e-4 for r in results["float32"])
    # The gates can fail: a float32 error of 2e-4 or a bf16 error twice HF's own drift is reported.
    worse = {
        "float32": [dataclasses.replace(results["float32"][0], max_abs=2e-4)],
        "bfloat16": [
            dataclasses.replace(r, mean_abs=2 * r.mean_abs) if r.name.startswith("ours") else r
            for r in results["bfloat16"]
        ],
    }
    assert len(parity.verdict(worse)) == 1 + len(results["bfloat16"]) // 2


def test_load_refuses_a_checkpoint_that_does_not_match(tiny_model_dir, tmp_path):
    import json
    import shutil

    from qwenvl_jax.weights import CheckpointMismatchError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96  # the weights say 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="mlp"):
        qwenvl_jax.load(bad, dtype="float32")
    with pytest.raises(FileNotFoundError, match="neither an HF checkpoint"):
        qwenvl_jax.load(tmp_path, dtype="float32")


def test_parity_command_line(tiny_model_dir, capsys):
    from qwenvl_jax.cli import main

    assert main(["parity", "--hf", str(tiny_model_dir), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "ours-float32 vs HF-fp32" in out and "parity: passed" in out
