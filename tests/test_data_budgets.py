"""Batch budgets, empty inputs and the skip log of the data pipeline.

Images of the tiny processor: red.png is 16 patch rows (grid 1x4x4), blue.png 24 (1x4x6). The SFT
stream below, with 4 rows, 64 image patch rows and at most 4 images per batch, groups greedily as
[s0 s1] [s2 s3 s4] [s5 s6]: each batch closes when the next example would overflow the budget.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data import BadRecord, SFTRecord, read_jsonl
from qwenvl_jax.data.pipeline import collate_pairs, encode_dpo, encode_sft, make_batches
from qwenvl_jax.processing import BatchSpec, InputError, Processor, collate
from qwenvl_jax.processing.batch import check_spec
from qwenvl_jax.tiny import write_tiny_checkpoint


def _write(path: pathlib.Path, lines) -> pathlib.Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _conv(rid, images, text="Compare"):
    blocks = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return {
        "id": rid,
        "messages": [{"role": "user", "content": blocks}, {"role": "assistant", "content": f"Answer {rid}."}],
        "images": images,
    }


def _doc(rid, image="img/red.png"):
    return {"id": rid, "image": image, "prefix": "Describe", "suffix": f"Caption {rid}."}


def _pair(rid, images):
    return {"id": rid, "images": images, "prompt": "Which?", "chosen": "This one.", "rejected": "That one."}


BLUE_RED = ["img/blue.png", "img/red.png"]
GROUPS = [("s0", "s1"), ("s2", "s3", "s4"), ("s5", "s6")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("budgets")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    (root / "img").mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "img" / "red.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(root / "img" / "blue.png")
    sft = _write(
        root / "sft.jsonl",
        [
            _doc("s0"),  # 1 image, 16 rows
            _conv("s1", BLUE_RED),  # 2 images, 40 rows
            _conv("s2", BLUE_RED),
            _doc("s3"),
            _conv("big", ["img/red.png"] * 5),  # line 5: 80 rows > 64 even alone
            _conv("s4", [], text="No picture"),
            _conv("wide", ["img/blue.png"] * 3),  # line 7: 72 rows > 64 even alone
            "{not json",
            _doc("s5"),
            _doc("gone", image="img/nope.png"),
            _conv("s6", BLUE_RED),
        ],
    )
    dpo = _write(
        root / "dpo.jsonl",
        [
            _pair("p0", ["img/red.png"]),  # both rows hold the image: 32 rows, 2 images
            _pair("p1", BLUE_RED),  # 80 rows, 4 images
            _pair("pbig", ["img/red.png"] * 3),  # line 3: 6 images for the pair > 4
            _pair("p2", ["img/red.png"]),
            _pair("p3", []),
        ],
    )
    processor = Processor.from_pretrained(ckpt)
    spec = BatchSpec(
        batch_size=4,
        seq_buckets=(64, 128),
        image_patches=64,
        max_images=4,
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return {"root": root, "ckpt": ckpt, "sft": sft, "dpo": dpo, "processor": processor, "spec": spec}


def _drain(it):
    batches, groups = [], []
    for batch in it:
        batches.append(batch)
        groups.append(it.last_ids)
    return batches, groups


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert x[k].tobytes() == y[k].tobytes(), k


def _examples(data):
    ids = {i for g in GROUPS for i in g}
    records = [r for r in read_jsonl(data["sft"]) if isinstance(r, SFTRecord) and r.id in ids]
    return {r.id: encode_sft(data["processor"], r) for r in records}


# ------------------------------------------------------------------------------------------ budgets
def test_sft_batches_close_before_the_budget_and_refuse_what_never_fits(data):
    spec, path = data["spec"], data["sft"]
    it = make_batches(path, data["ckpt"], spec, shuffle=False)
    batches, groups = _drain(it)
    assert groups == GROUPS  # every good example once, in stream order; none lost to a held-back one
    np.testing.assert_array_equal(
        [b["example_mask"].tolist() for b in batches], [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    )
    assert [int(b["num_images"]) for b in batches] == [3, 3, 3]
    examples = _examples(data)
    _assert_same(batches, [collate([examples[i] for i in g], spec) for g in groups])
    assert it.skipped.counts == {"too_long": 2, "malformed_json": 1, "missing_image": 1}
    shown = it.skipped.examples["too_long"]
    assert shown[0].startswith(f"big ({path}:5): its images need 80 patch rows, more than the budget 64")
    assert shown[1].startswith(f"wide ({path}:7): its images need 72 patch rows, more than the budget 64")
    # drop_remainder drops the batch the end of the data closed, not those a budget closed.
    it = make_batches(path, data["ckpt"], spec, shuffle=False, drop_remainder=True)
    assert _drain(it)[1] == GROUPS[:2]


def test_strict_policy_names_the_record_over_budget(data):
    it = make_batches(data["sft"], data["ckpt"], data["spec"], shuffle=False, policy="strict")
    next(it)
    with pytest.raises(BadRecord) as err:
        next(it)
    assert err.value.reason == "too_long" and err.value.location == f"{data['sft']}:5"
    assert f"record big ({data['sft']}:5): too_long: its images need 80 patch rows" in str(err.value)


def test_dpo_pairs_close_before_the_budget(data):
    spec = data["spec"]
    dpo_spec = BatchSpec(**{**spec.__dict__, "image_patches": 96})  # 2 pairs per batch
    it = make_batches(data["dpo"], data["ckpt"], dpo_spec, kind="dpo", shuffle=False)
    batches, groups = _drain(it)
    assert groups == [("p0",), ("p1",), ("p2", "p3")]  # p0 + p1 need 112 rows
    # A batch closed early keeps its halves aligned with dummy pairs.
    np.testing.assert_array_equal(batches[0]["example_mask"], [1, 0, 1, 0])
    # The images collated: each pair's once (its two rows read the same features).
    assert [int(b["num_images"]) for b in batches] == [1, 2, 1]
    assert it.skipped.counts == {"too_long": 1}
    (shown,) = it.skipped.examples["too_long"]
    assert shown.startswith(f"pbig ({data['dpo']}:3): chosen and rejected rows together: holds 6 images")
    records = {r.id: r for r in read_jsonl(data["dpo"])}
    _assert_same(batches[1:2], [collate_pairs([encode_dpo(data["processor"], records["p1"])], dpo_spec)])


def test_packed_batches_skip_what_never_fits(data):
    spec = BatchSpec(**{**data["spec"].__dict__, "batch_size": 2, "seq_buckets": (64, 192)})
    it = make_batches(data["sft"], data["ckpt"], spec, shuffle=False, pack=True)
    groups = _drain(it)[1]
    assert [i for g in groups for i in g] == [i for g in GROUPS for i in g]
    assert it.skipped.counts == {"too_long": 2, "malformed_json": 1, "missing_image": 1}
    it = make_batches(data["sft"], data["ckpt"], spec, shuffle=False, pack=True, policy="strict")
    with pytest.raises(BadRecord, match=rf"record big \({data['sft']}:5\): too_long"):
        _drain(it)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_restore_while_an_example_is_held_back(data, kind):
    path = data[kind]
    spec = data["spec"] if kind == "sft" else BatchSpec(**{**data["spec"].__dict__, "image_patches": 96})
    kwargs = dict(kind=kind, shuffle=False, num_epochs=None)
    it = make_batches(path, data["ckpt"], spec, **kwargs)
    next(it)  # closed by the budget: s2 (p1) is held for the next batch
    state = it.get_state()
    assert json.loads(state)["grain"].encode() != it._it.get_state()
    a, a_ids = [], []
    for _ in range(5):  # across the epoch boundary
        a.append(next(it))
        a_ids.append(it.last_ids)
    restored = make_batches(path, data["ckpt"], spec, **kwargs)
    restored.set_state(state)
    b, b_ids = [], []
    for _ in range(5):
        b.append(next(restored))
        b_ids.append(restored.last_ids)
    assert a_ids == b_ids and a_ids[0][0] == ("s2" if kind == "sft" else "p1")
    _assert_same(a, b)


# ------------------------------------------------------------------------------------- spec check
@pytest.mark.parametrize(
    "fields, kind, pack, min_pixels, name",
    [
        (dict(batch_size=0), "sft", False, None, "batch_size=0"),
        (dict(seq_buckets=(0, 64)), "sft", False, None, "seq_buckets=(0, 64)"),
        (dict(seq_buckets=(128, 64)), "sft", False, None, "seq_buckets=(128, 64)"),
        (dict(seq_buckets=()), "sft", False, None, "seq_buckets=()"),
        (dict(image_patches=10), "sft", False, None, "image_patches=10"),
        (dict(image_patches=-4), "sft", False, None, "image_patches=-4"),
        (dict(video_patches=6), "sft", False, None, "video_patches=6"),
        (dict(max_images=-1), "sft", False, None, "max_images=-1"),
        (dict(batch_size=3), "dpo", False, None, "batch_size=3"),
        (dict(image_patches=12), "sft", False, 3136, "image_patches=12"),  # 56x56: 16 rows
        (dict(image_patches=16), "dpo", False, 3136, "image_patches=16"),  # twice per pair
    ],
)
def test_check_spec_refuses_what_can_never_batch(fields, kind, pack, min_pixels, name):
    with pytest.raises(ValueError) as err:
        check_spec(BatchSpec(**{"batch_size": 2, **fields}), kind, pack, min_pixels=min_pixels)
    assert str(err.value).startswith(f"BatchSpec.{name}: ") and "\n" not in str(err.value)


def test_check_spec_accepts_what_text_only_records_can_fill():
    check_spec(BatchSpec(batch_size=1, image_patches=16), "sft", True, min_pixels=3136)
    check_spec(BatchSpec(batch_size=2, image_patches=32), "dpo", min_pixels=3136)
    check_spec(BatchSpec(batch_size=2, image_patches=0, max_images=0), "dpo", min_pixels=3136)
    with pytest.raises(ValueError, match="packing is for SFT"):
        check_spec(BatchSpec(batch_size=2), "dpo", True)


# ------------------------------------------------------------------------------------ empty input
def test_empty_files_are_refused_by_name(data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = _write(tmp_path / "blank.jsonl", ["", "  ", ""])
    for path in (empty, blank):
        with pytest.raises(InputError) as err:
            make_batches(path, data["ckpt"], data["spec"])
        assert str(err.value) == f"{path}: no records (empty or only blank lines)"
    # Among good files, the empty one is a mistake: refused, and only it is named.
    with pytest.raises(InputError, match=f"^{blank}: no records") as err:
        make_batches([data["sft"], blank], data["ckpt"], data["spec"])
    assert str(data["sft"]) not in str(err.value)
    one = _write(tmp_path / "one.jsonl", [_doc("only")])
    with pytest.raises(InputError, match="1 records for shard_count=2"):
        make_batches(one, data["ckpt"], data["spec"], shard_index=1, shard_count=2)


# --------------------------------------------------------------------------------------- skip log
def _log(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_skips_counted_once_across_epochs_and_logged_once(data, tmp_path):
    log = tmp_path / "skipped.jsonl"
    log.write_text("a line of an earlier run\n")  # a fresh stream starts the log afresh
    it = make_batches(data["sft"], data["ckpt"], data["spec"], seed=2, num_epochs=3, skip_log=log)
    _drain(it)
    assert it.skipped.counts == {"too_long": 2, "malformed_json": 1, "missing_image": 1}
    entries = _log(log)
    assert sorted(e["location"] for e in entries) == [f"{data['sft']}:{n}" for n in (10, 5, 7, 8)]
    assert all(e.keys() == {"id", "location", "reason", "detail"} for e in entries)
    big = next(e for e in entries if e["id"] == "big")
    assert big["reason"] == "too_long" and "more than the budget 64" in big["detail"]
    assert it.skipped.summary() == (
        f"4 records skipped (malformed_json=1, missing_image=1, too_long=2); each is listed in {log}"
    )
    # The state keeps locations, grouped by file.
    state = json.loads(it.get_state())["skipped"]
    assert state["locations"]["too_long"] == {str(data["sft"]): [5, 7]}


def test_skip_log_after_restore_equals_an_uninterrupted_run(data, tmp_path):
    kwargs = dict(seed=3, num_epochs=2)
    spec = BatchSpec(**{**data["spec"].__dict__, "batch_size": 2})
    whole = make_batches(data["sft"], data["ckpt"], spec, skip_log=tmp_path / "whole.jsonl", **kwargs)
    totals, whole_batches = [], []
    for batch in whole:
        whole_batches.append(batch)
        totals.append(whole.skipped.total)
    # Save after the first batch that passed some, not all, of the bad records.
    k = next(i for i, n in enumerate(totals) if 0 < n < 4) + 1
    log = tmp_path / "run.jsonl"
    it = make_batches(data["sft"], data["ckpt"], spec, skip_log=log, **kwargs)
    for _ in range(k):
        next(it)
    state = it.get_state()
    saved_lines = len(_log(log))
    for _ in range(3):  # work after the save, lost in a crash; its skips are in the log
        next(it)
    assert len(_log(log)) > saved_lines
    restored = make_batches(data["sft"], data["ckpt"], spec, skip_log=log, **kwargs)
    restored.set_state(state)
    assert len(_log(log)) == saved_lines and restored.skipped.total == totals[k - 1]
    rest = _drain(restored)[0]
    _assert_same(whole_batches[k:], rest)
    assert log.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert restored.skipped.counts == whole.skipped.counts and restored.skipped.total == 4


def test_skips_counted_once_across_epochs_and_restores(data):
    spec = BatchSpec(**{**data["spec"].__dict__, "image_patches": 512, "max_images": 16})  # all fit
    kwargs = dict(seed=4, num_epochs=3)
    it = make_batches(data["sft"], data["ckpt"], spec, **kwargs)
    next(it)
    state = it.get_state()
    _drain(it)
    assert it.skipped.counts == {"malformed_json": 1, "missing_image": 1}
    restored = make_batches(data["sft"], data["ckpt"], spec, **kwargs)
    restored.set_state(state)
    _drain(restored)
    assert restored.skipped.counts == it.skipped.counts


def test_a_frame_over_the_bound_is_refused_by_record(data):
    """`max_frame_patches` bounds every frame the vision tower's full blocks attend within: blue.png (1x4x6,
    24 patches) is over a bound of 16, so its records are skipped by name and line (or stop a strict run),
    and the others batch as before."""
    import dataclasses

    spec, path = dataclasses.replace(data["spec"], max_frame_patches=16), data["sft"]
    it = make_batches(path, data["ckpt"], spec, shuffle=False)
    _, groups = _drain(it)
    assert [i for g in groups for i in g] == ["s0", "s3", "s4", "s5"]
    shown = it.skipped.examples["too_long"]
    assert shown[0].startswith(
        f"s1 ({path}:2): a frame of 24 patches exceeds batch.max_frame_patches=16 (the bound data.max_pixels"
    )
    it = make_batches(path, data["ckpt"], spec, shuffle=False, policy="strict")
    with pytest.raises(BadRecord, match=rf"record s1 \({path}:2\): too_long: a frame of 24 patches"):
        next(it)


def test_the_frame_bound_follows_max_pixels(data):
    """Without `batch.max_frame_patches`, a run bounds frames by the processor's `max_pixels` (a frame of
    h x w pixels is (h/14)(w/14) patches), when that bound is under a third of the budget (else banding
    costs as much as the whole budget: 0); an explicit value, 0 included, is kept."""
    from qwenvl_jax.train.loop import frame_bound

    proc = Processor.from_pretrained(data["ckpt"], max_pixels=448 * 448)
    assert frame_bound({"image_patches": 8192}, proc) == 1024
    assert frame_bound({"image_patches": 2048}, proc) == 0  # 3 x 1024 >= 2048
    assert frame_bound({"image_patches": 8192, "max_frame_patches": 0}, proc) == 0
    assert frame_bound({"image_patches": 8192, "max_frame_patches": 512}, proc) == 512
    assert frame_bound({"image_patches": 8192}, data=({"max_pixels": 448 * 448})) == 1024  # the plan's
    assert frame_bound({"image_patches": 8192}) == 0  # the default 12,845,056 pixels: 65,536 patches
    # Videos count when the batch has a video budget: 768 x 28 x 28 pixels per frame, 3072 patches.
    assert frame_bound({"image_patches": 8192, "video_patches": 16384}, proc) == 3072
