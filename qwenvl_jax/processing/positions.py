"""Integer bookkeeping for Qwen2.5-VL: vision rotary ids, window permutation, segments, M-RoPE positions.

Everything here depends on image sizes only, so it runs on the host in numpy and is handed to jitted
code as index arrays; device code then sees static shapes. Each function is bit-identical to its
transformers 5.24 counterpart (spec sections 2.2-2.6 and 3.1-3.3), which the tests check.

Vocabulary: a *patch row* is one row of `pixel_values` (N rows per batch of images); a *merge unit* is
the U = m*m consecutive patch rows that the merger concatenates; *permuted order* is the window order in
which the vision blocks run (`permute_input_for_window_attn`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from qwenvl_jax.processing.errors import InputError

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
PAD_SEGMENT = -1  # segment id of budget-padding rows: equal only to other padding rows


def _as_grid(grid_thw, merge_size: int) -> np.ndarray:
    """`(n, 3)` int64 grid, checked: the merge reshapes need h and w divisible by the merge size."""
    grid_n3 = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    for i, (t, h, w) in enumerate(grid_n3.tolist()):
        if min(t, h, w) <= 0 or h % merge_size or w % merge_size:
            raise InputError(
                f"grid_thw[{i}] = {(t, h, w)}: need positive t and h, w divisible by {merge_size}"
            )
    return grid_n3


# --------------------------------------------------------------------------------------------------
# Vision tower (spec 2.2-2.6)


def vision_position_ids(grid_thw, merge_size: int = 2) -> np.ndarray:
    """`(N, 2)` int64 (h, w) rotary ids per patch row, in merge-block order, repeated over t (spec 2.2)."""
    grid_n3 = _as_grid(grid_thw, merge_size)
    m = merge_size
    out = [np.zeros((0, 2), np.int64)]
    for t, h, w in grid_n3.tolist():
        hw_2hw = np.indices((h, w), dtype=np.int64)
        # (2, h, w) -> (2, h/m, w/m, m, m): block row, block col, in-row, in-col, as pixel_values rows.
        blocks = hw_2hw.reshape(2, h // m, m, w // m, m).transpose(0, 1, 3, 2, 4).reshape(2, h * w)
        out.append(np.tile(blocks.T, (t, 1)))
    return np.concatenate(out)


def window_index(
    grid_thw, merge_size: int = 2, window_size: int = 112, patch_size: int = 14
) -> tuple[np.ndarray, np.ndarray]:
    """`(window_index (N/U,) int64, cu_window_seqlens int32)` exactly as `get_vision_window_index`.

    Windows are ws x ws merge units (ws = window_size // m // patch_size), padded per frame with a whole
    empty window even when divisible (HF's quirk); empty windows then vanish from the cu list through
    `unique_consecutive`. cu_window_seqlens counts patch rows, in permuted order.
    """
    grid_n3 = _as_grid(grid_thw, merge_size)
    ws = window_size // merge_size // patch_size
    if ws <= 0:
        raise ValueError(f"window_size {window_size} is smaller than one merge unit")
    unit = merge_size**2
    index_parts = [np.zeros(0, np.int64)]
    cu = [np.zeros(1, np.int64)]
    offset = 0
    for t, h, w in grid_n3.tolist():
        gh, gw = h // merge_size, w // merge_size
        nh, nw = gh // ws + 1, gw // ws + 1  # == (gh + ws - gh % ws) // ws
        padded = np.full((t, nh * ws, nw * ws), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        seqlens = (padded >= 0).sum(-1)
        flat = padded.reshape(-1)
        index_parts.append(flat[flat >= 0] + offset)
        cu.append(np.cumsum(seqlens) * unit + cu[-1][-1])
        offset += t * gh * gw
    cu_all = np.concatenate(cu).astype(np.int32)
    keep = np.concatenate([[True], cu_all[1:] != cu_all[:-1]])  # torch.unique_consecutive
    return np.concatenate(index_parts), cu_all[keep]


def full_attention_cu_seqlens(grid_thw) -> np.ndarray:
    """int32 `[0, cumsum(h*w repeated t times)]`: one segment per frame (`get_vision_cu_seqlens`)."""
    grid_n3 = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    seqlens = np.repeat(grid_n3[:, 1] * grid_n3[:, 2], grid_n3[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def patch_permutation(window_index: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """`(N,)` int64 gather index: `x_permuted = x[perm]`, each merge unit moving as U consecutive rows."""
    unit = merge_size**2
    wi = np.asarray(window_index, dtype=np.int64)
    return (wi[:, None] * unit + np.arange(unit)).reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """The gather index that undoes `perm`: `x[perm][inverse_permutation(perm)] == x`."""
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def segment_ids_from_cu(cu_seqlens: np.ndarray, total: int) -> np.ndarray:
    """`(total,)` int32 segment id of each row; rows at or past `cu_seqlens[-1]` get PAD_SEGMENT (-1)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    rows = np.arange(total)
    seg = np.searchsorted(cu, rows, side="right") - 1
    return np.where(rows < cu[-1], seg, PAD_SEGMENT).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class VisionIndices:
    """Everything the vision tower needs for one batch of grids, as static-shape host arrays.

    P = `num_rows` (the patch budget, or N when none was given); arrays marked "permuted" are indexed
    by position in window order, the order the blocks run in.

    Padding convention (rows N..P-1 when a budget is given): they sit at the END of the permuted order,
    map to themselves in every permutation (so `patch_perm`/`patch_inv` stay permutations of P rows),
    have rotary position (0, 0), `valid` False, and segment id PAD_SEGMENT (-1) in both segment arrays.
    A segment-equality mask therefore never lets a real row attend to a padding row or be attended by
    one, while each padding row still sees at least itself (no empty softmax rows, no NaN).
    Merge units past N/U likewise map to themselves in `unit_unperm`, so the merger output for real
    units is `y[unit_unperm][: num_patches // U]`.
    """

    grid_thw: np.ndarray  # (n, 3) int64
    num_patches: int  # N, real patch rows
    num_rows: int  # P >= N, the static budget
    merge_size: int
    rope_pos: np.ndarray  # (P, 2) int64 (h, w), permuted
    patch_perm: np.ndarray  # (P,) int64: x_permuted = x[patch_perm]
    patch_inv: np.ndarray  # (P,) int64: x = x_permuted[patch_inv]
    unit_unperm: np.ndarray  # (P/U,) int64 argsort(window_index): merged units back to raster order
    window_seg: np.ndarray  # (P,) int32, permuted; windowed blocks attend within equal ids
    full_seg: np.ndarray  # (P,) int32, permuted; full blocks attend within one frame
    valid: np.ndarray  # (P,) bool, permuted
    window_index: np.ndarray  # (N/U,) int64, as HF
    cu_window_seqlens: np.ndarray  # int32, as HF
    cu_seqlens: np.ndarray  # int32, as HF


def vision_indices(
    grid_thw,
    *,
    merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    num_patches: int | None = None,
) -> VisionIndices:
    """Build `VisionIndices` for `grid_thw`, padded to the static budget `num_patches` when given."""
    grid_n3 = _as_grid(grid_thw, merge_size)
    unit = merge_size**2
    n = int(grid_n3.prod(-1).sum())
    p = n if num_patches is None else int(num_patches)
    if p % unit:
        raise ValueError(f"patch budget {p} is not a multiple of the merge unit {unit}")
    if p < n:
        raise InputError(f"grids {grid_n3.tolist()} need {n} patch rows, more than the budget {p}")
    wi, cu_win = window_index(grid_n3, merge_size, window_size, patch_size)
    cu_full = full_attention_cu_seqlens(grid_n3)
    tail = np.arange(n, p, dtype=np.int64)
    perm = np.concatenate([patch_permutation(wi, merge_size), tail])
    rope = np.zeros((p, 2), np.int64)
    rope[:n] = vision_position_ids(grid_n3, merge_size)[perm[:n]]
    unit_unperm = np.concatenate([np.argsort(wi, kind="stable"), np.arange(n // unit, p // unit)])
    return VisionIndices(
        grid_thw=grid_n3,
        num_patches=n,
        num_rows=p,
        merge_size=merge_size,
        rope_pos=rope,
        patch_perm=perm,
        patch_inv=inverse_permutation(perm),
        unit_unperm=unit_unperm,
        window_seg=segment_ids_from_cu(cu_win, p),
        full_seg=segment_ids_from_cu(cu_full, p),
        valid=np.arange(p) < n,
        window_index=wi,
        cu_window_seqlens=cu_win,
        cu_seqlens=cu_full,
    )


class WindowGather(NamedTuple):
    """Dense layout of windowed attention: `xw = x_permuted[gather]` is `(num_windows, window_len, D)`."""

    gather: np.ndarray  # (num_windows, window_len) int32 row of x_permuted for each slot
    key_mask: np.ndarray  # (num_windows, window_len) bool, True for real keys
    scatter: np.ndarray  # (num_rows,) int32: x_permuted = xw.reshape(-1, D)[scatter]


def window_gather(
    cu_window_seqlens: np.ndarray, num_rows: int, *, max_windows: int | None = None, window_len: int = 64
) -> WindowGather:
    """Pad every window to `window_len` slots (spec 2.5) so windowed blocks are one batched attention.

    `max_windows` fixes the number of windows for a static shape (default: the actual count). Padded
    slots gather their window's first row with the key masked off; padded windows gather row 0 with
    only slot 0 unmasked, so every query has a real key and no softmax row is empty. `scatter` brings
    the window outputs back to permuted rows; budget-padding rows (past cu[-1]) read slot 0, garbage
    that their `valid` False already marks.
    """
    cu = np.asarray(cu_window_seqlens, dtype=np.int64)
    starts, lens = cu[:-1], np.diff(cu)
    nw = starts.size if max_windows is None else int(max_windows)
    if starts.size > nw:
        raise InputError(f"{starts.size} attention windows exceed the budget of {nw}")
    if lens.size and lens.max() > window_len:
        raise ValueError(f"a window holds {lens.max()} rows, more than window_len {window_len}")
    slot = np.arange(window_len)
    real = slot[None, :] < lens[:, None]
    gather = np.zeros((nw, window_len), np.int64)
    gather[: starts.size] = starts[:, None] + np.where(real, slot[None, :], 0)
    key_mask = np.zeros((nw, window_len), bool)
    key_mask[: starts.size] = real
    key_mask[starts.size :, 0] = True
    scatter = np.zeros(num_rows, np.int64)
    rows = np.arange(cu[-1])
    win = np.searchsorted(cu, rows, side="right") - 1
    scatter[: cu[-1]] = win * window_len + rows - cu[win]
    return WindowGather(gather.astype(np.int32), key_mask, scatter.astype(np.int32))


# --------------------------------------------------------------------------------------------------
# Language model (spec 3.1-3.3)


def scatter_positions(input_ids: np.ndarray, token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 `(b_idx, s_idx)` of every `token_id`, row-major, the order `masked_scatter` fills (spec 3.1)."""
    b_idx, s_idx = np.nonzero(np.asarray(input_ids) == token_id)
    return b_idx.astype(np.int32), s_idx.astype(np.int32)


def check_placeholder_count(
    input_ids: np.ndarray, token_id: int, num_features: int, what: str = "image"
) -> None:
    """Raise InputError unless the placeholders of `token_id` match the `num_features` feature rows."""
    per_row = (np.asarray(input_ids) == token_id).sum(-1).reshape(-1)
    if int(per_row.sum()) != num_features:
        raise InputError(
            f"{what} placeholders and features do not match: {int(per_row.sum())} tokens "
            f"(per batch row {per_row.tolist()}) for {num_features} feature rows"
        )


def get_rope_index(
    input_ids,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
    *,
    spatial_merge_size: int = 2,
    tokens_per_second: int | float = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    rule: str = "5.24",
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions `(3, B, S)` int64 and `rope_deltas` `(B, 1)` int64 (spec 3.2).

    Each maximal run of one token type in a row's valid tokens is text (0) or exactly one image (1) or
    video (2); grids and `second_per_grid_ts` are consumed in order across the whole batch. A vision run
    starting at `cur` gets `(cur + floor(k * interval), cur + row, cur + col)`, the temporal product taken
    in float32 as torch does (`interval = float32(tokens_per_second) * float32(second_per_grid_t)`, 1 for
    images). The text after it starts at `cur + max(h, w) // m` under rule "5.24" (transformers 5.24) or
    at `max(previous positions) + 1` under rule "legacy" (HF <= 4.5x, vLLM); they differ only for videos
    whose temporal extent exceeds their spatial one. Padding (`attention_mask` 0) stays 0, and
    `rope_deltas = max(position) + 1 - n_valid` under both rules (the 5.24 convention, which is what
    `decode_position_ids` expects). Text-only rows get `arange(n_valid)` and delta 0, as HF. Fully padded
    rows (HF crashes) get zeros.
    """
    if rule not in ("5.24", "legacy"):
        raise ValueError(f"rule must be '5.24' or 'legacy', not {rule!r}")
    ids_bs = np.asarray(input_ids)
    if ids_bs.ndim != 2:
        raise InputError(f"input_ids must be (batch, seq), got shape {ids_bs.shape}")
    if mm_token_type_ids is None:
        types_bs = np.where(ids_bs == image_token_id, 1, np.where(ids_bs == video_token_id, 2, 0))
    else:
        types_bs = np.asarray(mm_token_type_ids)
    mask_bs = (
        np.ones(ids_bs.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    )
    m = spatial_merge_size
    grids = {
        1: np.zeros((0, 3), np.int64) if image_grid_thw is None else _as_grid(image_grid_thw, m),
        2: np.zeros((0, 3), np.int64) if video_grid_thw is None else _as_grid(video_grid_thw, m),
    }
    if second_per_grid_ts is None:
        spg = np.ones(len(grids[2]), np.float32)
    else:
        spg = np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)
        if spg.size != len(grids[2]):
            raise InputError(f"{spg.size} second_per_grid_ts for {len(grids[2])} videos")
    names = {1: "image", 2: "video"}
    used = {1: 0, 2: 0}
    batch, seq = ids_bs.shape
    pos_3bs = np.zeros((3, batch, seq), np.int64)
    deltas_b = np.zeros(batch, np.int64)
    for b in range(batch):
        keep = np.flatnonzero(mask_bs[b])
        types = types_bs[b, keep]
        if keep.size == 0:
            continue
        bounds = np.concatenate([[0], np.flatnonzero(types[1:] != types[:-1]) + 1, [types.size]])
        pos_3n = np.empty((3, keep.size), np.int64)
        cur = 0
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            key = int(types[start])
            if key == 0:
                pos_3n[:, start:end] = np.arange(cur, cur + end - start)
                cur += end - start
                continue
            if key not in grids:
                raise InputError(f"batch row {b}: unknown mm_token_type {key} at valid token {start}")
            k = used[key]
            if k >= len(grids[key]):
                raise InputError(
                    f"batch row {b}: {names[key]} run at valid token {start} has no grid left "
                    f"({len(grids[key])} {names[key]}_grid_thw for more {names[key]} runs)"
                )
            t, h, w = grids[key][k].tolist()
            used[key] += 1
            gh, gw = h // m, w // m
            if end - start != t * gh * gw:
                raise InputError(
                    f"batch row {b}: {names[key]} {k} has {end - start} tokens but grid {(t, h, w)} "
                    f"needs {t * gh * gw} (= t*h*w/{m * m})"
                )
            if key == 2:
                interval = np.float32(tokens_per_second) * spg[k]
                tpos = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)  # truncation, as .long()
            else:
                tpos = np.arange(t, dtype=np.int64)
            t_thw, h_thw, w_thw = np.meshgrid(tpos, np.arange(gh), np.arange(gw), indexing="ij")
            pos_3n[:, start:end] = np.stack([t_thw, h_thw, w_thw]).reshape(3, -1) + cur
            if rule == "5.24":
                cur += max(h, w) // m
            else:
                cur = int(max(tpos[-1], gh - 1, gw - 1)) + cur + 1
        pos_3bs[:, b, keep] = pos_3n
        deltas_b[b] = pos_3n.max() + 1 - keep.size
    for key, name in names.items():
        if used[key] != len(grids[key]):
            raise InputError(
                f"{len(grids[key])} {name}_grid_thw but only {used[key]} {name} runs in the batch"
            )
    return pos_3bs, deltas_b[:, None]


def decode_position_ids(attention_mask, rope_deltas, steps: int, *, offset: int = 0) -> np.ndarray:
    """`(3, B, steps)` int64 positions of the next `steps` generated tokens (spec 3.3).

    The token generated `offset + k` steps after the prompt (`attention_mask` (B, S) of the prompt, new
    tokens all valid) sits at `n_valid[b] + offset + k + rope_deltas[b]` on all three axes, i.e. HF's
    `cumsum(mask) - 1 + rope_deltas`. Keeping `rope_deltas` as explicit state avoids HF's cached-on-module
    hazard.
    """
    n_valid_b = np.asarray(attention_mask).astype(bool).sum(-1).astype(np.int64)
    deltas_b = np.asarray(rope_deltas, dtype=np.int64).reshape(-1)
    pos_bk = (n_valid_b + deltas_b)[:, None] + offset + np.arange(steps, dtype=np.int64)
    return np.broadcast_to(pos_bk, (3, *pos_bk.shape)).copy()
