"""Static-shape collation: bucketed text, patch budgets, positions and scatter slots equal to HF's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conversion.tiny_hf import tiny_model_config
from qwenvl_jax.processing import BatchSpec, InputError, Processor, collate, pad_to_length

RNG = np.random.default_rng(3)


def _img(h, w):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def proc(tiny_ckpt):
    return Processor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLModel

    torch.manual_seed(0)
    return Qwen2_5_VLModel(tiny_model_config()).eval()


def _examples(proc):
    frames = [np.asarray(_img(56, 84)) for _ in range(4)]
    convs = [
        [
            {"role": "user", "content": [{"type": "image", "image": _img(150, 200)}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A picture."},
        ],
        [
            {"role": "user", "content": [
                {"type": "video", "video": frames, "sample_fps": 1.0, "min_pixels": 3136},
                {"type": "image", "image": _img(224, 112)},
                {"type": "text", "text": "Compare the clip and the picture."},
            ]},
            {"role": "assistant", "content": "They differ."},
        ],
        [{"role": "user", "content": "No pictures here."}, {"role": "assistant", "content": "Fine."}],
    ]  # fmt: skip
    out = []
    for i, conv in enumerate(convs):
        ex = proc.encode_chat([conv], labels=True, padding=False)
        ex["id"] = f"record-{i}"
        out.append(ex)
    return out


def _spec(proc, **kw):
    base = dict(
        batch_size=4, seq_buckets=(100, 128, 256, 512), image_patches=512, video_patches=256, max_images=4,
        max_videos=2, pad_token_id=proc.pad_token_id, image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
    )  # fmt: skip
    return BatchSpec(**{**base, **kw})


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collate_matches_hf_positions_and_padding(proc, hf_model, padding_side):
    examples = _examples(proc)
    batch = collate(examples, _spec(proc, padding_side=padding_side))
    n = max(e["input_ids"].shape[-1] for e in examples)
    assert 100 < n <= 128 and batch["input_ids"].shape == (4, 128)  # bucket of the longest, rows padded to 4
    assert batch["example_mask"].tolist() == [1, 1, 1, 0]
    for i, ex in enumerate(examples):
        row, mask = batch["input_ids"][i], batch["attention_mask"][i].astype(bool)
        np.testing.assert_array_equal(row[mask], ex["input_ids"][0])
        np.testing.assert_array_equal(batch["labels"][i][mask], ex["labels"][0])
        assert (batch["labels"][i][~mask] == -100).all() and (row[~mask] == proc.pad_token_id).all()
        valid = np.flatnonzero(mask)
        assert valid[0] == (128 - valid.size if padding_side == "left" else 0)
    # Positions: HF's get_rope_index on the same padded batch (real rows; the all-padding row crashes HF).
    real = batch["example_mask"].astype(bool)
    grids = {
        k: torch.as_tensor(batch[f"{k}_grid_thw"][: int(batch[f"num_{k}s"])].astype(np.int64))
        for k in ("image", "video")
    }
    pos, deltas = hf_model.get_rope_index(
        torch.as_tensor(batch["input_ids"][real].astype(np.int64)),
        mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"][real].astype(np.int64)),
        image_grid_thw=grids["image"],
        video_grid_thw=grids["video"],
        second_per_grid_ts=torch.as_tensor(batch["second_per_grid_ts"][: int(batch["num_videos"])]),
        attention_mask=torch.as_tensor(batch["attention_mask"][real].astype(np.int64)),
    )
    np.testing.assert_array_equal(batch["position_ids"][:, real], pos.numpy())
    np.testing.assert_array_equal(batch["rope_deltas"][real], deltas.numpy())
    assert (batch["position_ids"][:, ~real] == 0).all()


def test_static_shapes_do_not_depend_on_content(proc):
    examples = _examples(proc)
    spec = _spec(proc)
    a, b = collate(examples, spec), collate(examples[:1], spec)
    assert b["input_ids"].shape[1] == 100  # smaller content (95 tokens), smaller bucket
    c = collate(examples[:1], _spec(proc, seq_buckets=(128,)))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in c.items()}


def test_pad_to_length_equals_collating_into_the_longer_bucket(proc):
    examples = _examples(proc)[:1]  # 95 tokens: bucket 100
    short = collate(examples, _spec(proc, seq_buckets=(100,)))
    long = collate(examples, _spec(proc, seq_buckets=(256,)))
    padded = pad_to_length(short, 256, proc.pad_token_id)
    assert padded.keys() == long.keys()
    for key in long:
        np.testing.assert_array_equal(padded[key], long[key], err_msg=key)
        assert padded[key].dtype == long[key].dtype, key
    with pytest.raises(ValueError, match="down to"):
        pad_to_length(long, 100, proc.pad_token_id)
    left = collate(examples, _spec(proc, seq_buckets=(100,), padding_side="left"))
    with pytest.raises(ValueError, match="right-padded"):
        pad_to_length(left, 256, proc.pad_token_id)


def test_scatter_slots_reproduce_masked_scatter(proc):
    """Writing merged features through the slots fills placeholders in HF's row-major order."""
    batch = collate(_examples(proc), _spec(proc))
    b, s = batch["image_scatter_b"], batch["image_scatter_s"]
    seq = batch["input_ids"].shape[1]
    units = int(batch["image_valid"].sum()) // 4
    feats = np.arange(1, b.size + 1, dtype=np.int64)  # feature k carries the value k+1
    emb = np.zeros(batch["input_ids"].shape, np.int64)
    keep = s < seq  # unused slots are out of range: mode="drop" on device
    assert keep.sum() == units and (s[units:] == seq).all()
    emb[b[keep], s[keep]] = feats[keep]
    ref = torch.zeros(batch["input_ids"].shape, dtype=torch.int64)
    ref = ref.masked_scatter(
        torch.as_tensor(batch["input_ids"] == proc.image_token_id), torch.as_tensor(feats[:units])
    )
    np.testing.assert_array_equal(emb, ref.numpy())


def test_pixel_rows_and_vision_indices_padded_to_budget(proc):
    examples = _examples(proc)
    batch = collate(examples, _spec(proc))
    real_pixels = np.concatenate([e["pixel_values"] for e in examples if "pixel_values" in e])
    n = real_pixels.shape[0]
    assert batch["pixel_values"].shape == (512, 1176)
    np.testing.assert_array_equal(batch["pixel_values"][:n], real_pixels)
    assert not batch["pixel_values"][n:].any()
    assert batch["image_valid"].sum() == n and batch["image_patch_perm"].shape == (512,)
    np.testing.assert_array_equal(np.sort(batch["image_patch_perm"]), np.arange(512))
    np.testing.assert_array_equal(batch["image_patch_perm"][batch["image_patch_inv"]], np.arange(512))
    assert (batch["image_window_seg"][~batch["image_valid"]] == -1).all()


def test_over_budget_and_over_bucket_name_the_record(proc):
    examples = _examples(proc)
    with pytest.raises(InputError, match="more than the budget 64"):
        collate(examples, _spec(proc, image_patches=64))
    with pytest.raises(InputError, match=r"record-1.*largest sequence bucket 100"):
        collate(examples, _spec(proc, seq_buckets=(100,)))
    with pytest.raises(InputError, match="no video patch budget"):
        collate(examples, _spec(proc, video_patches=0))
    with pytest.raises(InputError, match="3 examples for a batch of 2"):
        collate(examples, _spec(proc, batch_size=2))


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="multiple of merge_size"):
        BatchSpec(batch_size=1, image_patches=10)
    with pytest.raises(ValueError, match="increasing"):
        BatchSpec(batch_size=1, seq_buckets=(512, 256))


@pytest.mark.parametrize("name", ["sft_1xh100.yaml", "generate.yaml"])
def test_shipped_batch_configs_load(name):
    from pathlib import Path

    spec = BatchSpec.from_yaml(
        Path(__file__).parent.parent / "configs" / "batch_specs" / name, pad_token_id=151643
    )
    assert spec.batch_size > 0 and spec.seq_buckets == tuple(sorted(spec.seq_buckets))
    assert spec.padding_side == ("left" if "generate" in name else "right")


def test_batch_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown batch spec keys"):
        BatchSpec.from_dict({"batch_size": 2, "seq_bukets": [64]})


def test_max_frame_patches_bands_the_full_blocks_exactly(proc, monkeypatch):
    """`max_frame_patches` bounds every frame (the image of 140 patches is the longest here), so the
    vision tower's full blocks attend band by band over blocks of that size (the bound travels as the
    shape of `image_full_block`): the model's outputs equal the unbounded batch's; a frame over the
    bound is refused by name."""
    import jax.numpy as jnp

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.loading import random_model
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS

    model = random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)
    examples = _examples(proc)
    plain = collate(examples, _spec(proc))
    banded = collate(examples, _spec(proc, max_frame_patches=144))
    assert "image_full_block" not in plain and banded["image_full_block"].shape == (144,)
    assert banded["video_full_block"].shape == (144,)

    import qwenvl_jax.model.vision as vision

    blocks, real = [], vision.banded_attention

    def spy(*args, block, **kw):
        blocks.append(block)
        return real(*args, block=block, **kw)

    monkeypatch.setattr(vision, "banded_attention", spy)

    def hidden(batch):
        return np.asarray(
            model.hidden_states(**{k: jnp.asarray(v) for k, v in batch.items() if k in CORE_KEYS})
        )

    want = hidden(plain)
    assert set(blocks) == {64}  # windows banded, full blocks over the whole budget
    blocks.clear()
    got = hidden(banded)
    assert set(blocks) == {64, 144}  # windows and the bounded frames
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    blocks.clear()  # a bound of a third of the budget or more: 3 blocks per query would cost more
    loose = hidden(collate(examples, _spec(proc, max_frame_patches=172)))
    assert set(blocks) == {64}
    np.testing.assert_allclose(loose, want, atol=2e-5 * np.abs(want).max())
    with pytest.raises(
        InputError, match=r"an image frame of 140 patches exceeds batch\.max_frame_patches=128"
    ):
        collate(examples, _spec(proc, max_frame_patches=128))


def test_pairs_encode_each_image_once_with_the_same_numbers(proc):
    """DPO's chosen and rejected rows hold the same images: `collate_pairs` encodes them once, in half the
    budget, and the rejected row reads the chosen row's features (`image_scatter_u`); the model's hidden
    states equal those of the same rows collated with every image encoded (the pre-sharing layout)."""
    import jax.numpy as jnp

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.data.pipeline import collate_pairs
    from qwenvl_jax.loading import random_model
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS

    examples = _examples(proc)
    img, text = examples[0], examples[2]
    pairs = [(img, {**img, "id": "rejected-0"}), (text, {**text, "id": "rejected-2"})]
    spec = _spec(proc, video_patches=0, max_videos=0)
    shared = collate_pairs(pairs, spec)
    plain = collate([img, text, pairs[0][1], pairs[1][1]], spec)
    assert shared["pixel_values"].shape == (256, 1176) and plain["pixel_values"].shape == (512, 1176)
    assert shared["image_scatter_b"].shape == plain["image_scatter_b"].shape == (128,)
    units = int(img["image_grid_thw"].prod()) // 4
    np.testing.assert_array_equal(shared["image_scatter_u"][: 2 * units], np.tile(np.arange(units), 2))
    for key in ("input_ids", "attention_mask", "position_ids", "labels"):
        np.testing.assert_array_equal(shared[key], plain[key], err_msg=key)

    model = random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)

    def hidden(batch):
        inputs = {k: jnp.asarray(v) for k, v in batch.items() if k in CORE_KEYS}
        return np.asarray(model.hidden_states(**inputs))

    want = hidden(plain)
    np.testing.assert_allclose(hidden(shared), want, atol=2e-5 * np.abs(want).max())

    other = {**img, "id": "rejected-other", "pixel_values": img["pixel_values"] + 1.0}
    with pytest.raises(InputError, match="its images are meant to be those of example record-0 but differ"):
        collate_pairs([(img, other)], spec)
    with pytest.raises(InputError, match=r"image_patches=500 must be a multiple of 8"):
        collate_pairs(pairs, _spec(proc, image_patches=500, video_patches=0))
