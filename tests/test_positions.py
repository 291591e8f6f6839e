"""Host index bookkeeping vs transformers 5.24: vision ids, windows, segments, M-RoPE positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from conversion.tiny_hf import tiny_model_config
from qwenvl_jax.processing import positions as P
from qwenvl_jax.processing.errors import InputError

IMG, VID, VSTART, VEND, PAD = 332, 333, 329, 330, 320
TINY_IDS = dict(image_token_id=IMG, video_token_id=VID)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return Qwen2_5_VLModel(tiny_model_config()).eval()


def hf_vision(grid):
    g = torch.tensor(np.asarray(grid, np.int64).reshape(-1, 3))
    wi, cu_w = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    return (
        get_vision_position_ids(g, 2).numpy(),
        wi.numpy(),
        cu_w.numpy(),
        get_vision_cu_seqlens(g).numpy(),
    )


def random_grids(rng, n):
    """Mixed images and videos; merged sides 1..20 cover sizes divisible and not divisible by 4."""
    t = rng.choice([1, 1, 2, 3, 4], size=n)
    hw = 2 * rng.integers(1, 21, size=(n, 2))
    return np.column_stack([t, hw]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# vision tower


@pytest.mark.parametrize(
    ("grid", "wi", "cu"),
    [
        (
            [[1, 10, 14]],
            [0, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 17, 21, 22, 23, 24, 4, 5, 6, 11, 12, 13, 18, 19, 20, 25,
             *range(26, 30), *range(30, 35)],
            [0, 64, 112, 128, 140],
        ),
        ([[1, 16, 8]], list(range(32)), [0, 64, 128]),
        ([[1, 10, 14], [1, 16, 8]], None, [0, 64, 112, 128, 140, 204, 268]),
    ],
)  # fmt: skip
def test_window_index_spec_examples(grid, wi, cu):
    ours_wi, ours_cu = P.window_index(grid)
    _, hf_wi, hf_cu, _ = hf_vision(grid)
    if wi is not None:
        assert np.array_equal(ours_wi, wi)
    assert np.array_equal(ours_cu, cu)
    assert np.array_equal(ours_wi, hf_wi) and ours_wi.dtype == np.int64
    assert np.array_equal(ours_cu, hf_cu) and ours_cu.dtype == np.int32


def test_vision_position_ids_spec_example():
    pos = P.vision_position_ids([[1, 4, 6]])
    assert pos[:16, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3]
    assert pos[:16, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(25))
def test_vision_indices_match_hf_random(seed):
    rng = np.random.default_rng(seed)
    grid = random_grids(rng, int(rng.integers(1, 5)))
    hf_pos, hf_wi, hf_cu_w, hf_cu = hf_vision(grid)
    pos = P.vision_position_ids(grid)
    wi, cu_w = P.window_index(grid)
    cu = P.full_attention_cu_seqlens(grid)
    assert np.array_equal(pos, hf_pos) and pos.dtype == np.int64
    assert np.array_equal(wi, hf_wi)
    assert np.array_equal(cu_w, hf_cu_w) and cu_w.dtype == np.int32
    assert np.array_equal(cu, hf_cu) and cu.dtype == np.int32


def _hf_permute(x, window_index, unit=4):
    """HF's permute_input_for_window_attn on a numpy array."""
    return x.reshape(-1, unit, *x.shape[1:])[window_index].reshape(x.shape)


@pytest.mark.parametrize("seed", range(10))
def test_permutation_and_segments_properties(seed):
    rng = np.random.default_rng(100 + seed)
    grid = random_grids(rng, int(rng.integers(1, 4)))
    n = int(grid.prod(-1).sum())
    vi = P.vision_indices(grid)
    x = rng.standard_normal((n, 3))
    # The permutation is HF's block permutation, and inverse composes to the identity both ways.
    assert np.array_equal(x[vi.patch_perm], _hf_permute(x, vi.window_index))
    assert np.array_equal(vi.patch_perm[vi.patch_inv], np.arange(n))
    assert np.array_equal(vi.patch_inv[vi.patch_perm], np.arange(n))
    assert np.array_equal(vi.rope_pos, _hf_permute(P.vision_position_ids(grid), vi.window_index))
    assert np.array_equal(vi.unit_unperm, np.argsort(vi.window_index))
    # Permuted segment ids reproduce the cu lists: contiguous runs with HF's lengths.
    for seg, cu in ((vi.window_seg, vi.cu_window_seqlens), (vi.full_seg, vi.cu_seqlens)):
        assert np.all(np.diff(seg) >= 0)
        assert np.array_equal(np.bincount(seg), np.diff(cu))
    # Full segments after permuting are the per-frame segments of the raster rows (spec 2.3's claim).
    frame_raster = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    assert np.array_equal(vi.full_seg, frame_raster[vi.patch_perm])
    # Every window segment is one frame's ws x ws block of merge cells, and distinct windows differ.
    keys = []
    for t, h, w in grid.tolist():
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // 2), np.arange(w // 2), indexing="ij")
        keys.append(np.stack([tt.ravel(), hh.ravel() // 4, ww.ravel() // 4], -1))
    unit_keys = np.concatenate([np.column_stack([np.full(len(k), i), k]) for i, k in enumerate(keys)])
    row_keys = unit_keys[vi.patch_perm // 4]
    for s in range(vi.window_seg.max() + 1):
        assert len(np.unique(row_keys[vi.window_seg == s], axis=0)) == 1
    assert len(np.unique(row_keys, axis=0)) == vi.window_seg.max() + 1


def test_vision_indices_padding_convention():
    grid = [[1, 10, 14], [2, 8, 6]]
    base = P.vision_indices(grid)
    n = base.num_patches
    assert n == 140 + 96
    padded = P.vision_indices(grid, num_patches=n + 20)
    for name in ("patch_perm", "patch_inv", "rope_pos", "window_seg", "full_seg"):
        assert np.array_equal(getattr(padded, name)[:n], getattr(base, name)), name
    assert np.array_equal(padded.unit_unperm[: n // 4], base.unit_unperm)
    assert np.array_equal(padded.unit_unperm[n // 4 :], np.arange(n // 4, (n + 20) // 4))
    assert np.array_equal(padded.patch_perm[n:], np.arange(n, n + 20))
    assert np.array_equal(np.sort(padded.patch_perm), np.arange(n + 20))
    assert not padded.rope_pos[n:].any()
    assert padded.valid.tolist() == [True] * n + [False] * 20
    for seg in (padded.window_seg, padded.full_seg):
        assert np.all(seg[n:] == P.PAD_SEGMENT) and np.all(seg[:n] >= 0)
        same = seg[:, None] == seg[None, :]
        assert not same[:n, n:].any() and same[n:, n:].all()
    with pytest.raises(InputError, match="budget"):
        P.vision_indices(grid, num_patches=n - 4)
    with pytest.raises(InputError, match="divisible"):
        P.vision_indices([[1, 10, 7]])


def _segment_attention(x_nd, seg_n):
    logits = x_nd @ x_nd.T
    logits = np.where(seg_n[:, None] == seg_n[None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ x_nd


def test_window_gather_equals_segment_attention():
    rng = np.random.default_rng(7)
    grid = [[1, 10, 14], [2, 16, 8], [1, 2, 2]]
    vi = P.vision_indices(grid, num_patches=540)
    wg = P.window_gather(vi.cu_window_seqlens, vi.num_rows, max_windows=16)
    n = vi.num_patches
    assert wg.gather.shape == (16, 64) and wg.gather.dtype == np.int32 and wg.scatter.dtype == np.int32
    assert np.array_equal(wg.gather[wg.key_mask][:n], np.arange(n))
    assert wg.key_mask.any(-1).all()
    x = rng.standard_normal((vi.num_rows, 8)) * 0.3
    xw = x[wg.gather]  # (W, 64, D)
    logits = np.einsum("wqd,wkd->wqk", xw, xw)
    logits = np.where(wg.key_mask[:, None, :], logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    out_w = np.einsum("wqk,wkd->wqd", a / a.sum(-1, keepdims=True), xw)
    out = out_w.reshape(-1, 8)[wg.scatter]
    ref = _segment_attention(x[:n], vi.window_seg[:n])
    np.testing.assert_allclose(out[:n], ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="windows"):
        P.window_gather(vi.cu_window_seqlens, vi.num_rows, max_windows=3)


# ---------------------------------------------------------------------------------------------------
# language model positions


def build_batch(rows, *, padding="left", seed=0):
    """ids/mask/types for rows of ("text", n) | ("image", grid) | ("video", grid) segments."""
    rng = np.random.default_rng(seed)
    seqs = []
    for row in rows:
        ids = []
        for kind, arg in row:
            if kind == "text":
                ids += rng.integers(0, 300, size=arg).tolist()
            else:
                ids += [VSTART] + [IMG if kind == "image" else VID] * (int(np.prod(arg)) // 4) + [VEND]
        seqs.append(ids)
    s = max(map(len, seqs))
    ids_bs = np.full((len(seqs), s), PAD, np.int64)
    mask_bs = np.zeros((len(seqs), s), np.int64)
    for b, ids in enumerate(seqs):
        sl = slice(s - len(ids), s) if padding == "left" else slice(0, len(ids))
        ids_bs[b, sl] = ids
        mask_bs[b, sl] = 1
    types_bs = np.where(ids_bs == IMG, 1, np.where(ids_bs == VID, 2, 0))
    img = [g for row in rows for k, g in row if k == "image"]
    vid = [g for row in rows for k, g in row if k == "video"]
    return (
        ids_bs,
        mask_bs,
        types_bs,
        np.array(img or np.zeros((0, 3)), np.int64),
        np.array(vid or np.zeros((0, 3)), np.int64),
    )


def hf_rope(model, ids, types, img, vid, spg, mask):
    def as_t(a, dt=torch.long):
        return None if a is None or len(a) == 0 else torch.tensor(np.asarray(a), dtype=dt)

    pos, deltas = model.get_rope_index(
        as_t(ids),
        mm_token_type_ids=as_t(types, torch.int),
        image_grid_thw=as_t(img),
        video_grid_thw=as_t(vid),
        second_per_grid_ts=as_t(spg, torch.float32),
        attention_mask=as_t(mask),
    )
    return pos.numpy(), deltas.numpy()


def ours_rope(ids, types, img, vid, spg, mask, **kw):
    img, vid, spg = (None if a is None or len(a) == 0 else a for a in (img, vid, spg))
    return P.get_rope_index(ids, types, img, vid, spg, mask, **TINY_IDS, **kw)


def test_rope_index_spec_video_example(hf_model):
    ids, mask, types, img, vid = build_batch([[("text", 21), ("video", (4, 4, 6)), ("text", 5)]])
    spg = np.array([0.5], np.float32)
    pos, deltas = ours_rope(ids, types, img, vid, spg, mask)
    hf_pos, hf_deltas = hf_rope(hf_model, ids, types, img, vid, spg, mask)
    assert np.array_equal(pos, hf_pos) and np.array_equal(deltas, hf_deltas)
    assert pos.dtype == deltas.dtype == np.int64 and deltas.shape == (1, 1)
    video = types[0] == 2
    # 21 text tokens + vision_start: the video starts at 22.
    assert np.unique(pos[0, 0, video]).tolist() == [22, 23, 24, 25]
    assert pos[:, 0, np.flatnonzero(video)[-1] + 1].tolist() == [25, 25, 25]  # vision_end under 5.24
    legacy, legacy_deltas = ours_rope(ids, types, img, vid, spg, mask, rule="legacy")
    assert np.array_equal(legacy[:, :, video], pos[:, :, video])
    assert legacy[:, 0, np.flatnonzero(video)[-1] + 1].tolist() == [26, 26, 26]
    assert legacy_deltas[0, 0] == deltas[0, 0] + 1


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rope_index_padded_batch_matches_hf(hf_model, padding):
    rows = [
        [
            ("text", 5),
            ("image", (1, 10, 14)),
            ("text", 3),
            ("video", (6, 4, 6)),
            ("text", 2),
            ("image", (1, 4, 4)),
        ],
        [("text", 2), ("image", (1, 16, 8)), ("text", 4)],
        [("text", 7), ("video", (4, 8, 10)), ("text", 1), ("video", (2, 2, 2)), ("text", 3)],
        [("text", 4)],
    ]
    ids, mask, types, img, vid = build_batch(rows, padding=padding, seed=1)
    assert mask.min() == 0
    for spg in ([0.5, 0.083333336, 1.4], [2 / 3, 3.0, 0.3]):
        spg = np.array(spg, np.float32)
        pos, deltas = ours_rope(ids, types, img, vid, spg, mask)
        hf_pos, hf_deltas = hf_rope(hf_model, ids, types, img, vid, spg, mask)
        assert np.array_equal(pos, hf_pos)
        assert np.array_equal(deltas, hf_deltas)
    # Types derived from the ids give the same result.
    pos2, deltas2 = ours_rope(ids, None, img, vid, spg, mask)
    assert np.array_equal(pos2, pos) and np.array_equal(deltas2, deltas)


def test_rope_index_default_second_per_grid_and_no_mask(hf_model):
    ids, _, types, img, vid = build_batch(
        [[("text", 3), ("video", (4, 4, 4)), ("image", (1, 6, 4)), ("text", 2)]]
    )
    pos, deltas = ours_rope(ids, types, img, vid, None, None)
    hf_pos, hf_deltas = hf_rope(hf_model, ids, types, img, vid, None, None)
    assert np.array_equal(pos, hf_pos) and np.array_equal(deltas, hf_deltas)


def test_rope_index_text_only(hf_model):
    ids, mask, types, _, _ = build_batch([[("text", 9)], [("text", 4)]], seed=3)
    pos, deltas = ours_rope(ids, types, None, None, None, mask)
    hf_pos, hf_deltas = hf_rope(hf_model, ids, types, None, None, None, mask)
    assert np.array_equal(pos, hf_pos) and np.array_equal(deltas, hf_deltas)
    assert np.array_equal(pos[0, 1], [0] * 5 + list(range(4))) and not deltas.any()


def test_decode_positions_continue_the_prompt():
    """Generated text tokens get the positions get_rope_index would give them in the longer prompt."""
    rows = [
        [("text", 3), ("video", (4, 4, 6)), ("text", 2)],
        [("text", 1), ("image", (1, 6, 8)), ("text", 1)],
    ]
    ids, mask, _, img, vid = build_batch(rows)
    spg = np.array([0.5], np.float32)
    ext_ids = np.concatenate([ids, np.full((2, 4), 7)], 1)
    ext_mask = np.concatenate([mask, np.ones((2, 4), np.int64)], 1)
    for rule in ("5.24", "legacy"):
        _, deltas = ours_rope(ids, None, img, vid, spg, mask, rule=rule)
        full, _ = ours_rope(ext_ids, None, img, vid, spg, ext_mask, rule=rule)
        dec = P.decode_position_ids(mask, deltas, 3, offset=1)
        assert dec.shape == (3, 2, 3) and dec.dtype == np.int64
        assert np.array_equal(dec, full[:, :, -3:])


def test_rope_index_errors():
    rows = [
        [("text", 2), ("image", (1, 4, 4)), ("text", 1)],
        [("text", 2), ("image", (1, 4, 6)), ("text", 1)],
    ]
    ids, mask, types, img, _ = build_batch(rows)
    with pytest.raises(InputError, match="batch row 1: image 1 has 6 tokens"):
        ours_rope(ids, types, np.array([[1, 4, 4], [1, 4, 4]]), None, None, mask)
    with pytest.raises(InputError, match="batch row 1: image run"):
        ours_rope(ids, types, img[:1], None, None, mask)
    with pytest.raises(InputError, match="3 image_grid_thw but only 2"):
        ours_rope(ids, types, np.concatenate([img, img[:1]]), None, None, mask)
    with pytest.raises(InputError, match="second_per_grid_ts"):
        ours_rope(ids, types, img, None, np.ones(1, np.float32), mask)
    with pytest.raises(ValueError, match="rule"):
        ours_rope(ids, types, img, None, None, mask, rule="4.49")


def test_scatter_positions_match_masked_scatter():
    rows = [
        [("text", 2), ("image", (1, 4, 4)), ("text", 1), ("image", (1, 2, 4))],
        [("image", (1, 4, 2)), ("text", 3)],
    ]
    ids, _, _, _, _ = build_batch(rows)
    n = int((ids == IMG).sum())
    feats = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    ref = torch.zeros(*ids.shape, 3).masked_scatter(torch.tensor(ids == IMG)[..., None], torch.tensor(feats))
    b_idx, s_idx = P.scatter_positions(ids, IMG)
    assert b_idx.dtype == s_idx.dtype == np.int32
    emb = np.zeros((*ids.shape, 3), np.float32)
    emb[b_idx, s_idx] = feats
    assert np.array_equal(emb, ref.numpy())
    P.check_placeholder_count(ids, IMG, n)
    with pytest.raises(InputError, match=r"per batch row \[6, 2\]"):
        P.check_placeholder_count(ids, IMG, n + 1)
