"""SFT packing (`processing.packing`): exact against the same examples unpacked, on the tiny random model.

Four conversations of the tiny processor: A (one 4x4 image, 62 tokens), B (two images, 108), C (an image
and a 2-frame-group video, 70) and D (text, 51). With 2 rows of at most 144 tokens, first-fit puts A and
C in row 0 and B in row 1, so the row-major vision order (A, C, B) differs from the given one; D does not
fit with them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from qwenvl_jax import losses
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.loading import random_model
from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS
from qwenvl_jax.processing import (
    BatchSpec,
    ExampleSize,
    InputError,
    Packer,
    PackPlan,
    Processor,
    collate,
    get_rope_index,
    pack_examples,
    plan_batches,
)
from qwenvl_jax.tiny import write_tiny_checkpoint

ATOL = 1e-5


def _conv(content, answer):
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    processor = Processor.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt")))
    rng = np.random.default_rng(0)

    def img(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    video = rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    convs = {
        "A": _conv([{"type": "image", "image": img(56, 56)}, {"type": "text", "text": "Describe"}], "A red cat."),
        "B": _conv(
            [
                {"type": "image", "image": img(84, 56)},
                {"type": "text", "text": "Compare the two pictures"},
                {"type": "image", "image": img(56, 112)},
            ],
            "The dog is blue and the cat is red, and the bird sits on the tree.",
        ),
        "C": _conv(
            [
                {"type": "image", "image": img(56, 84)},
                {"type": "video", "video": video, "resized_height": 56, "resized_width": 56, "sample_fps": 1.0},
                {"type": "text", "text": "What?"},
            ],
            "A cat.",
        ),
        "D": _conv("Hi there", "Hello."),
    }  # fmt: skip
    examples = {}
    for name, conv in convs.items():
        out = processor.encode_chat([conv], labels=True, padding=False)
        ex = {"id": name, "input_ids": out["input_ids"][0], "labels": out["labels"][0]}
        ex.update({k: v for k, v in out.items() if "grid" in k or "pixel" in k or k == "second_per_grid_ts"})
        examples[name] = ex
    assert [examples[k]["input_ids"].size for k in "ABCD"] == [62, 108, 70, 51]
    spec = BatchSpec(
        batch_size=2,
        seq_buckets=(64, 144),
        image_patches=128,
        video_patches=64,
        max_images=4,
        max_videos=2,
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return examples, spec


@functools.cache
def _model():
    return random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)


@nnx.jit
def _stats(model, batch):
    h_bsd = model.hidden_states(**{k: batch[k] for k in CORE_KEYS if k in batch})
    return h_bsd, losses.token_logprobs(h_bsd, model.lm_head_matrix(), batch["labels"])


def _run(batch):
    with jax.default_matmul_precision("highest"):
        h_bsd, st = _stats(_model(), {k: jax.numpy.asarray(v) for k, v in batch.items()})
    return np.asarray(h_bsd), {k: np.asarray(v) for k, v in st.items()}


def _segments(batch, examples):
    """{example id: (row, start, length)} read back from the packed `attention_mask` and input ids."""
    out = {}
    for r, seg in enumerate(batch["attention_mask"]):
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            ids = batch["input_ids"][r, where]
            (name,) = [n for n, ex in examples.items() if np.array_equal(ex["input_ids"], ids)]
            out[name] = (r, int(where[0]), where.size)
    return out


# --------------------------------------------------------------------------------------- layout
def test_layout_positions_labels_and_vision_order(setup):
    examples, spec = setup
    abc = [examples[k] for k in "ABC"]
    batch = pack_examples(abc, spec)
    assert batch["input_ids"].shape == (2, 144) and batch["position_ids"].shape == (3, 2, 144)
    assert "rope_deltas" not in batch
    assert _segments(batch, examples) == {"A": (0, 0, 62), "C": (0, 62, 70), "B": (1, 0, 108)}
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 62 + [2] * 70 + [0] * 12)
    np.testing.assert_array_equal(batch["example_mask"], [1, 1])
    for name, (r, start, n) in _segments(batch, examples).items():
        ex = examples[name]
        alone, _ = get_rope_index(
            ex["input_ids"][None],
            None,
            ex.get("image_grid_thw"),
            ex.get("video_grid_thw"),
            ex.get("second_per_grid_ts"),
            spatial_merge_size=2,
            tokens_per_second=2,
            image_token_id=spec.image_token_id,
            video_token_id=spec.video_token_id,
        )
        np.testing.assert_array_equal(batch["position_ids"][:, r, start : start + n], alone[:, 0])
        assert batch["labels"][r, start] == -100
        np.testing.assert_array_equal(batch["labels"][r, start + 1 : start + n], ex["labels"][1:])
    assert (batch["position_ids"][:, 0, 132:] == 0).all() and (batch["labels"][0, 132:] == -100).all()
    # The video's temporal positions step by tokens_per_second * second_per_grid_ts = 4, not 1.
    c_video = batch["position_ids"][0, 0][batch["input_ids"][0] == spec.video_token_id]
    assert sorted(set(c_video.tolist()))[1] - sorted(set(c_video.tolist()))[0] == 4
    # Vision inputs in row-major placement order: A's image, C's image, then B's two.
    order = [examples["A"], examples["C"], examples["B"]]
    grids = np.concatenate([ex["image_grid_thw"] for ex in order])
    np.testing.assert_array_equal(batch["image_grid_thw"][: batch["num_images"]], grids)
    pixels = np.concatenate([ex["pixel_values"] for ex in order])
    np.testing.assert_array_equal(batch["pixel_values"][: len(pixels)], pixels)
    np.testing.assert_array_equal(batch["video_grid_thw"][:1], examples["C"]["video_grid_thw"])
    assert batch["second_per_grid_ts"][0] == 2.0


# ------------------------------------------------------------------------------------ exactness
def test_packed_equals_unpacked_logprobs_and_loss(setup):
    examples, spec = setup
    abc = [examples[k] for k in "ABC"]
    packed = pack_examples(abc, spec)
    unpacked = collate(abc, dataclasses.replace(spec, batch_size=3))  # one example per row
    h_p, st_p = _run(packed)
    h_u, st_u = _run(unpacked)
    for i, (name, (r, start, n)) in enumerate(sorted(_segments(packed, examples).items())):
        assert unpacked["input_ids"][i, :n].tolist() == examples[name]["input_ids"].tolist()
        # Every token's hidden state, vision placeholders included.
        np.testing.assert_allclose(h_p[r, start : start + n], h_u[i, :n], atol=ATOL, rtol=0, err_msg=name)
        # Position start + t - 1 scores the label at t, for t = 1 .. n-1.
        mask_p, mask_u = st_p["label_mask"][r, start : start + n - 1], st_u["label_mask"][i, : n - 1]
        np.testing.assert_array_equal(mask_p, mask_u)
        assert mask_u.sum() > 0
        np.testing.assert_allclose(
            st_p["log_probs"][r, start : start + n - 1], st_u["log_probs"][i, : n - 1], atol=ATOL, rtol=0
        )
    n_items = losses.sft_num_items_in_batch([packed["labels"]])
    assert n_items == losses.sft_num_items_in_batch([unpacked["labels"]]) == st_u["label_mask"].sum()
    assert st_p["label_mask"].sum() == n_items  # nothing scored across a segment boundary or in padding
    loss_p = losses.sft_loss(st_p["log_probs"], st_p["label_mask"], num_items_in_batch=n_items)
    loss_u = losses.sft_loss(st_u["log_probs"], st_u["label_mask"], num_items_in_batch=n_items)
    np.testing.assert_allclose(float(loss_p), float(loss_u), atol=ATOL, rtol=0)


def test_segments_cannot_see_each_other(setup):
    examples, spec = setup
    batch = pack_examples([examples[k] for k in "ABC"], spec)
    h0, st0 = _run(batch)
    changed = {k: v.copy() for k, v in batch.items()}
    # Segment 1 of row 0 is A: new text tokens (not its image placeholders) and new pixels for its image,
    # the first 16 rows of the budget.
    a_text = (changed["attention_mask"][0] == 1) & (changed["mm_token_type_ids"][0] == 0)
    changed["input_ids"][0, a_text] = (changed["input_ids"][0, a_text] + 7) % 300
    changed["pixel_values"][:16] += 1.0
    h1, st1 = _run(changed)
    a, c = slice(0, 62), slice(62, 132)
    assert np.abs(h1[0, a] - h0[0, a]).max() > 1e-2  # A itself changed...
    np.testing.assert_array_equal(h1[0, c], h0[0, c])  # ...C, in the same row, not at all
    np.testing.assert_array_equal(st1["log_probs"][0, 62:131], st0["log_probs"][0, 62:131])
    np.testing.assert_array_equal(h1[1, :108], h0[1, :108])  # nor B, in the other row


# -------------------------------------------------------------------------------------- planning
def test_first_fit_picks_the_smallest_bucket_that_holds_all():
    spec = BatchSpec(batch_size=2, seq_buckets=(32, 64))
    packer = Packer(spec)
    assert packer.add(ExampleSize(30)) and packer.add(ExampleSize(30))
    assert packer.plan() == PackPlan(32, ((0,), (1,)))  # one per row fits the small bucket
    assert packer.add(ExampleSize(20))  # the small bucket is out; in the large one both 30s share row 0
    assert packer.plan() == PackPlan(64, ((0, 1), (2,)))
    assert not packer.add(ExampleSize(50)) and packer.plan() == PackPlan(64, ((0, 1), (2,)))
    assert packer.add(ExampleSize(44)) and packer.add(ExampleSize(4))
    assert packer.plan() == PackPlan(64, ((0, 1, 4), (2, 3)))  # first fit: the 4 goes back to row 0
    assert packer.plan().order == (0, 1, 4, 2, 3) and len(packer) == 5
    with pytest.raises(InputError, match="no examples to pack"):
        Packer(spec).plan()


def test_patch_budget_and_item_limits_refuse_without_changing_the_plan():
    spec = BatchSpec(batch_size=4, seq_buckets=(64,), image_patches=32, max_images=3, video_patches=16)
    packer = Packer(spec)
    assert packer.add(ExampleSize(10, image_patches=16, images=1))
    assert not packer.add(ExampleSize(10, image_patches=20, images=1))  # 36 > 32 patch rows
    assert packer.add(ExampleSize(10, image_patches=8, images=2))
    assert not packer.add(ExampleSize(10, image_patches=4, images=1))  # a 4th image > max_images=3
    assert packer.add(ExampleSize(10, video_patches=12, videos=1))
    assert not packer.add(ExampleSize(10, video_patches=8, videos=1)) and len(packer) == 3  # 20 > 16
    assert packer.plan() == PackPlan(64, ((0, 1, 2), (), (), ()))


def test_plan_batches_groups_a_stream_greedily():
    spec = BatchSpec(batch_size=2, seq_buckets=(32, 64), image_patches=16)
    sizes = [ExampleSize(40), ExampleSize(30), ExampleSize(20), ExampleSize(60), ExampleSize(5, 16, 1)]
    plans = plan_batches(sizes, spec)
    # 40 and 30 take rows 0 and 1, 20 goes back to row 0; 60 fits nowhere and starts the next batch,
    # where 5 goes to row 1.
    assert plans == [PackPlan(64, ((0, 2), (1,))), PackPlan(64, ((3,), (4,)))]
    assert plan_batches([ExampleSize(10)], spec) == [PackPlan(32, ((0,), ()))]


def test_errors_name_the_example(setup):
    examples, spec = setup
    with pytest.raises(InputError, match="example D: does not fit in one packed batch with the 3"):
        pack_examples([examples[k] for k in "ABCD"], spec)
    small = dataclasses.replace(spec, seq_buckets=(64, 100))
    with pytest.raises(InputError, match="example B: 108 tokens exceed the largest sequence bucket 100"):
        pack_examples([examples["A"], examples["B"]], small)
    with pytest.raises(InputError, match="example B: its images need 56 patch rows, more than the budget 32"):
        pack_examples([examples["B"]], dataclasses.replace(spec, image_patches=32))
    with pytest.raises(InputError, match="example C: holds videos but the batch spec has no video"):
        pack_examples([examples["C"]], dataclasses.replace(spec, video_patches=0))
    with pytest.raises(InputError, match="example 1: holds 2 images, more than max_images=1"):
        Packer(dataclasses.replace(spec, max_images=1)).add(ExampleSize.of(examples["B"]), name=1)
    with pytest.raises(InputError, match="no examples to pack"):
        pack_examples([], spec)
    with pytest.raises(InputError, match="example 9: 200 tokens exceed the largest sequence bucket"):
        plan_batches([ExampleSize(10)] * 9 + [ExampleSize(200)], small)
