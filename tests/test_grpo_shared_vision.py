"""GRPO micro-batches encode each prompt's images once (`rl.batch.micro_batches`, `collate(share=...)`):
the rows of one prompt read the features of its first row, the vision budget is the static
`shared_vision_budget` (k_max prompts' shares), and the numbers are those of every row encoding its own.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.processing import BatchSpec, Processor, collate
from qwenvl_jax.rl.batch import (
    Rollouts,
    max_prompts_per_micro_batch,
    micro_batches,
    prompt_share,
    shared_vision_budget,
    training_examples,
)

# Patch rows a prompt may hold: one 112x112 image (8x8 patches). A multiple of the tower's 64-row windows,
# so that the band padding of its attention does not blur the FLOPs ratio.
SHARE = 64
# (h, w) of each prompt's image, None: text only; all within SHARE.
IMAGE_SIZES = ((56, 84), (112, 112), (84, 56), None, (56, 56), (56, 112))
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return Processor.from_pretrained(tiny_ckpt)


def _prompts(processor, count):
    out = []
    for i in range(count):
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        content = [{"type": "text", "text": f"What is in picture {i}?"}]
        if size is not None:
            pixels = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
            content.insert(0, {"type": "image", "image": Image.fromarray(pixels)})
        enc = processor.encode_chat([[{"role": "user", "content": content}]], add_generation_prompt=True,
                                    padding=False)  # fmt: skip
        prompt = {"id": f"p{i}", "input_ids": np.asarray(enc["input_ids"][0])}
        if size is not None:
            prompt.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
            assert prompt["pixel_values"].shape[0] <= SHARE
        out.append(prompt)
    return out


def _rollouts(prompts, G):
    rows = len(prompts) * G
    lengths = RNG.integers(2, 7, rows)
    tokens = np.zeros((rows, 6), np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = RNG.integers(3, 300, n)  # ordinary tokens, never a vision placeholder
    logprobs = np.where(np.arange(6) < lengths[:, None], -RNG.random((rows, 6)), 0).astype(np.float32)
    return Rollouts(tokens, lengths, logprobs, lengths < 6, G)


def _spec(processor, B):
    return BatchSpec(batch_size=B, seq_buckets=(64, 128), image_patches=SHARE * B, max_images=B,
                     pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
                     video_token_id=processor.video_token_id)  # fmt: skip


def _layout(processor, G, B, num_mb):
    prompts = _prompts(processor, B * num_mb // G)
    rollouts = _rollouts(prompts, G)
    advantages = RNG.standard_normal(len(rollouts.lengths)).astype(np.float32)
    spec = _spec(processor, B)
    micro = micro_batches(prompts, rollouts, advantages, spec, num_micro_batches=num_mb)
    # The same rows, each encoding its own images (the layout before sharing), with the same extra keys.
    examples = training_examples(prompts, rollouts)
    seq = micro[0]["input_ids"].shape[1]
    plain = []
    for m, mb in enumerate(micro):
        batch = collate(examples[m * B : (m + 1) * B], dataclasses.replace(spec, seq_buckets=(seq,)))
        batch.update({k: mb[k] for k in ("advantages", "sampling_per_token_logps")})
        plain.append(batch)
    return prompts, rollouts, spec, micro, plain


def test_budget_is_static_per_layout():
    """k_max depends on the layout alone; groups that straddle micro-batches count in both."""
    assert max_prompts_per_micro_batch(4, 4, 2) == 1
    assert max_prompts_per_micro_batch(4, 2, 2) == 2
    assert max_prompts_per_micro_batch(4, 3, 3) == 2  # rows 4..7: prompts 1, 1, 2, 2
    assert max_prompts_per_micro_batch(16, 8, 16) == 2  # configs/grpo_3b_8xh100.yaml
    assert max_prompts_per_micro_batch(16, 5, 10) == 4  # configs/grpo_7b_8xh100.yaml: rows 16..31 -> 3..6
    assert max_prompts_per_micro_batch(8, 5, 10) == 3  # configs/recipes/geometry3k_*.yaml
    batch = {"batch_size": 16, "image_patches": 16384, "max_images": 16}
    assert prompt_share(batch) == {
        "image_patches": 1024,
        "video_patches": 0,
        "max_images": 1,
        "max_videos": 0,
    }
    want = {"image_patches": 2048, "video_patches": 0, "max_images": 2, "max_videos": 0}
    assert shared_vision_budget(batch, 8, 16, batch_shards=8) == want
    # Rounded up to whole merge units on every device: 1 x 16 rows -> 4 x 8.
    assert (
        shared_vision_budget({"batch_size": 4, "image_patches": 64}, 4, 2, batch_shards=8)["image_patches"]
        == 32
    )
    with pytest.raises(ValueError, match=r"batch\.image_patches=20 with kind: grpo.*use a multiple of 32"):
        shared_vision_budget({"batch_size": 4, "image_patches": 20}, 4, 2, batch_shards=8)


@pytest.mark.parametrize(("G", "B", "num_mb", "k_max"), [(4, 4, 2, 1), (2, 4, 2, 2), (3, 4, 3, 2)])
def test_micro_batches_encode_each_prompts_images_once(processor, G, B, num_mb, k_max):
    prompts, rollouts, spec, micro, plain = _layout(processor, G, B, num_mb)
    units = spec.image_patches // 4
    budget = shared_vision_budget(dataclasses.asdict(spec), G, num_mb)
    assert budget["image_patches"] == k_max * SHARE and budget["max_images"] == k_max
    for m, (mb, ref) in enumerate(zip(micro, plain, strict=True)):
        # The text side is untouched: ids, labels, M-RoPE positions (which need every row's grids).
        for key in ("input_ids", "attention_mask", "labels", "position_ids", "rope_deltas", "seq_lengths"):
            np.testing.assert_array_equal(mb[key], ref[key], err_msg=key)
        # Pixel rows: the distinct prompts' images, in order of first appearance, then padding.
        seen = dict.fromkeys(int(p) for p in rollouts.prompt_index[m * B : (m + 1) * B])
        pixels = [prompts[p]["pixel_values"] for p in seen if "pixel_values" in prompts[p]]
        n = sum(len(x) for x in pixels)
        assert mb["pixel_values"].shape == (k_max * SHARE, 1176)
        np.testing.assert_array_equal(mb["pixel_values"][:n], np.concatenate(pixels))
        assert not mb["pixel_values"][n:].any()
        assert int(mb["num_images"]) == len(pixels)
        # One slot per unit of the unshared budget; each placeholder's slot reads the unit holding the same
        # pixels as the unshared batch's slot of that placeholder.
        assert mb["image_scatter_b"].shape == mb["image_scatter_u"].shape == (units,)
        real = mb["image_scatter_s"] < mb["input_ids"].shape[1]
        assert (
            real.sum()
            == (mb["input_ids"] == spec.image_token_id).sum()
            == (ref["image_scatter_s"] < 64).sum()
        )
        for key in ("image_scatter_b", "image_scatter_s"):
            np.testing.assert_array_equal(mb[key], ref[key], err_msg=key)
        blocks = mb["pixel_values"].reshape(-1, 4, 1176)[mb["image_scatter_u"][real]]
        np.testing.assert_array_equal(blocks, ref["pixel_values"].reshape(-1, 4, 1176)[np.flatnonzero(real)])
    # One compiled shape: every micro-batch has the same keys and shapes.
    assert len({tuple((k, np.shape(v)) for k, v in sorted(mb.items())) for mb in micro}) == 1


def test_shared_micro_batch_scores_like_the_unshared_one(processor):
    """Log-probs and the GRPO loss (KL reference pass and old log-probs included) of a micro-batch whose
    rows share images equal those of the same rows each encoding its own, in float32; the vision tower
    encodes k_max / B of the patch rows, and its FLOPs are at most that fraction."""
    from flax import nnx

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.loading import random_model
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS
    from qwenvl_jax.train.grpo_step import grpo_loss_fn, score_fn
    from qwenvl_jax.train.state import split_model

    G, B, num_mb, k_max = 3, 4, 3, 2
    _, _, _, micro, plain = _layout(processor, G, B, num_mb)
    shared, ref = micro[1], plain[1]  # rows 4..7: prompts 1 and 2 (images), each straddling a boundary
    assert shared["pixel_values"].shape[0] * B == ref["pixel_values"].shape[0] * k_max
    model = random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)
    graphdef, params, frozen = split_model(model, "full")
    ref_params = jax.tree.map(lambda x: x * 1.01, params)  # a reference that differs from the policy
    score = jax.jit(score_fn(graphdef, frozen))
    loss_fn = jax.jit(grpo_loss_fn(graphdef, frozen, jnp.float32(20.0), ref_params, beta=0.04))

    def run(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        old = score(params, batch)
        loss, metrics = loss_fn(jax.tree.map(lambda x: x * 0.99, params), {**batch, "old_per_token_logps": old},
                                jax.random.key(0))  # fmt: skip
        return np.asarray(old), float(loss), {k: float(v) for k, v in metrics.items()}

    old_s, loss_s, metrics_s = run(shared)
    old_r, loss_r, metrics_r = run(ref)
    assert (old_r != 0).sum() > 10
    np.testing.assert_allclose(old_s, old_r, rtol=1e-6, atol=1e-6 * np.abs(old_r).max())
    np.testing.assert_allclose(loss_s, loss_r, rtol=1e-6)
    for key, value in metrics_r.items():
        np.testing.assert_allclose(metrics_s[key], value, rtol=1e-5, atol=1e-7, err_msg=key)

    def tower_flops(batch):
        vision = {
            k: jnp.asarray(v)
            for k, v in batch.items()
            if k in CORE_KEYS and k.startswith(("pixel", "image_"))
        }
        fn = jax.jit(lambda p, v: nnx.merge(graphdef, p, frozen).vision_features(**v))
        cost = fn.lower(params, vision).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    assert tower_flops(shared) <= k_max / B * tower_flops(ref)
