"""JSONL records and the grain pipeline: formats, skip policy, shuffling, sharding, checkpoints, DPO pairs."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data import BadRecord, DPORecord, SFTRecord, parse_line, read_jsonl
from qwenvl_jax.data.pipeline import collate_pairs, encode_dpo, encode_sft, make_batches
from qwenvl_jax.processing import BatchSpec, ExampleSize, InputError, Processor, pack_examples, plan_batches
from qwenvl_jax.tiny import write_tiny_checkpoint

GOOD = 10  # good SFT records in sft.jsonl


def _write(path: pathlib.Path, lines) -> pathlib.Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    img = root / "img"
    img.mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(img / "red.png")  # grid (1, 4, 4): 4 tokens
    Image.new("RGB", (84, 56), (30, 30, 200)).save(img / "blue.png")  # grid (1, 4, 6): 6 tokens
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = [
        {"id": f"g{i}", "image": "img/red.png", "prefix": "Describe", "suffix": f"A cat {i}."}
        if i % 2
        else {
            "id": f"g{i}",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]},
                {"role": "assistant", "content": f"The dog {i}."},
            ],
            "images": ["img/blue.png", "img/red.png"],
        }
        for i in range(GOOD)
    ]  # fmt: skip
    bad = [
        "{not json",
        {"id": "missing", "image": "img/nope.png", "prefix": "Describe", "suffix": "x"},
        {"id": "corrupt", "image": "img/corrupt.png", "prefix": "Describe", "suffix": "x"},
        {"id": "long", "image": "img/red.png", "prefix": "Describe", "suffix": "the cat " * 200},
        {
            "id": "mismatch",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "ok"},
            ],
            "images": ["img/red.png", "img/blue.png"],
        },
    ]
    # Bad lines interleaved with good ones, plus a blank line that is not a record.
    lines = good[:3] + bad[:3] + [""] + good[3:6] + bad[3:] + good[6:]
    sft = _write(root / "sft.jsonl", lines)
    dpo = _write(
        root / "dpo.jsonl",
        [
            {"id": "p0", "images": ["img/red.png"], "prompt": "What is it?", "chosen": "A cat.", "rejected": "A dog."},
            {
                "id": "p1",
                "images": ["img/blue.png", "img/red.png"],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}],
                "chosen": [{"role": "assistant", "content": "The left one is blue."}],
                "rejected": [{"role": "assistant", "content": "Both are red."}],
            },
            {"id": "p2", "images": ["img/red.png"], "prompt": "Colour?", "chosen": "Red.", "rejected": "Green, no."},
        ],
    )  # fmt: skip
    processor = Processor.from_pretrained(ckpt)
    spec = BatchSpec(
        batch_size=4,
        seq_buckets=(64, 128),
        image_patches=256,
        max_images=8,
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    return {"root": root, "ckpt": ckpt, "sft": sft, "dpo": dpo, "processor": processor, "spec": spec}


def _drain(it):
    batches, ids = [], []
    for batch in it:
        batches.append(batch)
        ids.extend(it.last_ids)
    return batches, ids


# ------------------------------------------------------------------------------------------- records
def test_records_formats_ids_and_placeholders(data):
    root = str(data["root"])
    records = read_jsonl(data["sft"])
    assert len(records) == GOOD + 5  # the blank line is no record
    good = [r for r in records if isinstance(r, SFTRecord) and r.id.startswith("g")]
    assert [r.id for r in good] == [f"g{i}" for i in range(GOOD)]
    doc = good[1]
    assert doc.messages[0]["content"][0] == {"type": "image", "image": f"{root}/img/red.png"}
    assert doc.messages[0]["content"][1] == {"type": "text", "text": "Describe"}
    assert doc.messages[1] == {"role": "assistant", "content": "A cat 1."}
    # Placeholders filled in order: blue then red, paths resolved against the JSONL's directory.
    conv = good[0].messages[0]["content"]
    assert [b.get("image") for b in conv] == [f"{root}/img/blue.png", None, f"{root}/img/red.png"]
    bad = [r for r in records if isinstance(r, BadRecord)]
    assert [(b.reason, b.record_id) for b in bad] == [
        ("malformed_json", f"{data['sft']}:4"),
        ("invalid", "mismatch"),
    ]
    assert bad[1].location == f"{data['sft']}:12" and "2 images" in str(bad[1])
    dpo = read_jsonl(data["dpo"])
    assert all(isinstance(r, DPORecord) for r in dpo)
    assert dpo[0].prompt[0]["content"] == [
        {"type": "image", "image": f"{root}/img/red.png"},
        {"type": "text", "text": "What is it?"},
    ]
    assert dpo[1].chosen == {"role": "assistant", "content": "The left one is blue."}
    assert [b.get("image") for b in dpo[1].prompt[0]["content"]][:2] == [
        f"{root}/img/blue.png",
        f"{root}/img/red.png",
    ]


@pytest.mark.parametrize(
    "line, needle",
    [
        ('["a list"]', "JSON object"),
        ('{"id": "u", "foo": 1}', "unknown record format"),
        ('{"id": "u", "image": "a.png", "prefix": 3, "suffix": "x"}', "'prefix' must be a string"),
        ('{"id": "u", "messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
        (
            '{"id": "u", "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}',
            "more image placeholders",
        ),
        ('{"id": "u", "prompt": "q", "chosen": "a"}', "needs 'rejected'"),
        (
            '{"id": "u", "prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
            "one assistant",
        ),
    ],
)
def test_invalid_records_name_id_and_line(line, needle):
    with pytest.raises(BadRecord, match=needle) as err:
        parse_line(line, path="/d/x.jsonl", line=7)
    assert err.value.reason == "invalid" and err.value.location == "/d/x.jsonl:7"
    assert err.value.record_id == ("/d/x.jsonl:7" if line.startswith("[") else "u")
    assert isinstance(err.value, InputError) and "/d/x.jsonl:7" in str(err.value)


# ------------------------------------------------------------------------------------------ encoding
def test_encode_sft_matches_encode_chat(data):
    processor, rec = data["processor"], read_jsonl(data["sft"])[0]
    ex = encode_sft(processor, rec)
    ref = processor.encode_chat([rec.messages], labels=True, padding=False)
    assert ex["id"] == "g0"
    np.testing.assert_array_equal(ex["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(ex["labels"], ref["labels"][0])
    np.testing.assert_array_equal(ex["image_grid_thw"], [[1, 4, 6], [1, 4, 4]])
    with pytest.raises(BadRecord, match="more than max_length=10") as err:
        encode_sft(processor, rec, max_length=10)
    assert err.value.reason == "too_long"


def test_dpo_pairs_share_prompt_and_images(data):
    processor = data["processor"]
    for rec in read_jsonl(data["dpo"]):
        chosen, rejected = encode_dpo(processor, rec)
        assert chosen["pixel_values"] is rejected["pixel_values"]  # processed once
        start = int(np.argmax(chosen["completion_mask"]))
        assert start == int(np.argmax(rejected["completion_mask"])) > 0
        np.testing.assert_array_equal(chosen["input_ids"][:start], rejected["input_ids"][:start])
        for ex, completion in ((chosen, rec.chosen), (rejected, rec.rejected)):
            # Labels are exactly the completion turn: its text plus <|im_end|>\n.
            assert ex["completion_mask"][start:].all() and not ex["completion_mask"][:start].any()
            text = processor.tokenizer.decode(ex["labels"][start:])
            assert text == completion["content"] + "<|im_end|>\n"
            assert (ex["labels"][:start] == -100).all()
        # The prompt with its images equals what encode_chat makes of it.
        ref = processor.encode_chat([[*rec.prompt, rec.chosen]], labels=True, padding=False)
        np.testing.assert_array_equal(ref["input_ids"][0], chosen["input_ids"])
        np.testing.assert_array_equal(ref["pixel_values"], chosen["pixel_values"])


def test_dpo_batches_layout(data):
    spec = BatchSpec(**{**data["spec"].__dict__, "batch_size": 4})  # 2 pairs per batch
    it = make_batches(data["dpo"], data["ckpt"], spec, kind="dpo", shuffle=False)
    batches, ids = _drain(it)
    assert ids == ["p0", "p1", "p2"] and len(batches) == 2
    full, short = batches
    for b in batches:
        # Each pair's images once: half the spec's budget of 256 patch rows.
        assert b["input_ids"].shape in ((4, 64), (4, 128)) and b["pixel_values"].shape == (128, 1176)
    # [chosen x 2, rejected x 2]: the rows of a pair share their prompt.
    for c, r in ((0, 2), (1, 3)):
        start = int(np.argmax(full["labels"][c] != -100))
        np.testing.assert_array_equal(full["input_ids"][c, :start], full["input_ids"][r, :start])
    # The short batch keeps the halves aligned with masked dummy rows.
    np.testing.assert_array_equal(short["example_mask"], [1, 0, 1, 0])
    assert short["attention_mask"][[1, 3]].sum() == 0 and (short["labels"][[1, 3]] == -100).all()
    with pytest.raises(InputError):
        collate_pairs([], spec)


# ------------------------------------------------------------------------------------- skip policy
def test_skip_policy_counts_by_reason(data):
    it = make_batches(data["sft"], data["ckpt"], data["spec"], shuffle=False)
    batches, ids = _drain(it)
    assert ids == [f"g{i}" for i in range(GOOD)]  # the good ones, once each, in file order
    assert it.skipped.counts == {
        "malformed_json": 1, "missing_image": 1, "corrupt_image": 1, "too_long": 1, "invalid": 1,
    }  # fmt: skip
    assert it.skipped.total == 5
    shown = {k: v[0] for k, v in it.skipped.examples.items()}
    assert shown["missing_image"].startswith(f"missing ({data['sft']}:5)")
    assert shown["corrupt_image"].startswith("corrupt (") and shown["too_long"].startswith("long (")
    assert shown["malformed_json"].startswith(f"{data['sft']}:4")
    assert "too_long=1" in it.skipped.summary()
    # Full batches of good records; static shapes from the spec.
    np.testing.assert_array_equal([b["example_mask"].sum() for b in batches], [4, 4, 2])
    for b in batches:
        seq = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["labels"].shape == (4, seq) and seq in (64, 128)
        assert b["position_ids"].shape[-2:] == (4, seq)
        assert b["pixel_values"].shape == (256, 1176) and b["image_grid_thw"].shape == (8, 3)


def test_all_records_skipped_fails_instead_of_looping(data, tmp_path):
    bad = [{"id": f"b{i}", "image": "img/nope.png", "prefix": "p", "suffix": "s"} for i in range(3)]
    path = _write(tmp_path / "bad.jsonl", [json.dumps(r) for r in bad])
    (tmp_path / "img").mkdir()
    it = make_batches(path, data["ckpt"], data["spec"], num_epochs=None)  # repeats forever
    with pytest.raises(InputError, match=r"all 3 records were skipped.*missing_image=\d+"):
        next(it)


@pytest.mark.parametrize(
    "bad, reason, rid",
    [
        ("{not json", "malformed_json", None),
        ({"id": "b", "image": "img/nope.png", "prefix": "p", "suffix": "s"}, "missing_image", "b"),
        ({"id": "b", "image": "img/corrupt.png", "prefix": "p", "suffix": "s"}, "corrupt_image", "b"),
        ({"id": "b", "image": "img/red.png", "prefix": "p", "suffix": "the cat " * 200}, "too_long", "b"),
        ({"id": "b", "messages": [{"role": "user", "content": "hi"}]}, "invalid", "b"),
    ],
)
def test_strict_policy_stops_naming_id_and_line(data, bad, reason, rid):
    path = _write(
        data["root"] / f"strict_{reason}.jsonl",
        [{"id": "ok", "image": "img/red.png", "prefix": "p", "suffix": "s"}, bad],
    )
    it = make_batches(path, data["ckpt"], data["spec"], policy="strict", shuffle=False)
    with pytest.raises(BadRecord) as err:
        next(it)
    assert err.value.reason == reason and err.value.location == f"{path}:2"
    assert f"record {rid or f'{path}:2'} ({path}:2)" in str(err.value)
    # The same file under `skip` yields the good record and counts the bad one.
    it = make_batches(path, data["ckpt"], data["spec"], shuffle=False)
    assert _drain(it)[1] == ["ok"] and it.skipped.counts == {reason: 1}


# ------------------------------------------------------------------------------ order and sharding
def test_shuffle_is_seeded(data):
    def order(seed):
        return _drain(make_batches(data["sft"], data["ckpt"], data["spec"], seed=seed))[1]

    a, b, c = order(0), order(0), order(1)
    assert a == b and sorted(a) == sorted(f"g{i}" for i in range(GOOD))
    assert a != c and sorted(a) == sorted(c)
    assert a != [f"g{i}" for i in range(GOOD)]


def test_two_shards_partition_the_records(data):
    lines = [x for x in data["sft"].read_text().splitlines() if x.startswith('{"id": "g')]
    path = _write(data["root"] / "good.jsonl", lines)  # 10 good lines: 2 shards of 5

    def shard(i, path=path):
        kwargs = dict(seed=3, shard_index=i, shard_count=2)
        return _drain(make_batches(path, data["ckpt"], data["spec"], **kwargs))[1]

    a, b = shard(0), shard(1)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert sorted(a + b) == sorted(f"g{i}" for i in range(GOOD))
    # 15 lines: every process gets 7 lines (equal step counts), the 15th is left out; still disjoint.
    a, b = shard(0, data["sft"]), shard(1, data["sft"])
    assert not set(a) & set(b) and set(a + b) == {f"g{i}" for i in range(GOOD)} - {"g9"}


# ------------------------------------------------------------------------------------- checkpoints
def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert x[k].tobytes() == y[k].tobytes(), k


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_checkpoint_restore_mid_epoch(data, kind):
    path = data["sft"] if kind == "sft" else data["dpo"]
    spec = data["spec"] if kind == "sft" else BatchSpec(**{**data["spec"].__dict__, "batch_size": 2})
    kwargs = dict(kind=kind, seed=7, num_epochs=None)  # repeats: 6 batches cross epoch boundaries
    it = make_batches(path, data["ckpt"], spec, **kwargs)
    _take(it, 3)
    state = it.get_state()
    assert isinstance(state, bytes)
    skipped = dict(it.skipped.counts)
    assert kind == "dpo" or sum(skipped.values()) >= 5  # 12 good records: the first epoch's bad ones passed
    a = _take(it, 3)
    restored = make_batches(path, data["ckpt"], spec, **kwargs)
    restored.set_state(state)
    assert restored.skipped.counts == skipped
    b = _take(restored, 3)
    _assert_same(a, b)
    # A fresh iterator without the state starts over, so the equality above is not trivial.
    assert (
        next(make_batches(path, data["ckpt"], spec, **kwargs))["input_ids"].tobytes()
        != a[0]["input_ids"].tobytes()
    )


def test_worker_processes_give_the_same_batches(data):
    kwargs = dict(seed=5, num_epochs=2)
    t0 = time.perf_counter()
    with_workers = make_batches(data["sft"], data["ckpt"], data["spec"], worker_count=2, **kwargs)
    a = _take(with_workers, 3)
    state = with_workers.get_state()
    a += _take(with_workers, 2)
    assert time.perf_counter() - t0 < 20
    b = make_batches(data["sft"], data["ckpt"], data["spec"], **kwargs)
    _assert_same(a, _take(b, 5))
    restored = make_batches(data["sft"], data["ckpt"], data["spec"], worker_count=2, **kwargs)
    restored.set_state(state)
    _assert_same(a[3:], _take(restored, 2))
    assert restored.skipped.counts == with_workers.skipped.counts


# ---------------------------------------------------------------------------------------- boundary
def test_data_package_never_imports_jax():
    package = pathlib.Path(__file__).parents[1] / "qwenvl_jax" / "data"
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "import jax" not in text and "from jax" not in text, source
    # The record parsers load without jax (grain itself imports jax.profiler, so the pipeline cannot).
    code = "import sys, qwenvl_jax.data; qwenvl_jax.data.read_jsonl; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ packing
def _pack_spec(data):
    # 2 rows of up to 192 tokens: about three 62-67-token examples per row, up to 8 images per batch.
    return BatchSpec(**{**data["spec"].__dict__, "batch_size": 2, "seq_buckets": (64, 192)})


def _good_examples(data):
    records = [r for r in read_jsonl(data["sft"]) if isinstance(r, SFTRecord) and r.id.startswith("g")]
    return {r.id: encode_sft(data["processor"], r) for r in records}


def test_packed_batches_take_examples_while_they_fit(data):
    spec = _pack_spec(data)
    it = make_batches(data["sft"], data["ckpt"], spec, shuffle=False, pack=True)
    batches, groups = [], []
    for batch in it:
        batches.append(batch)
        groups.append(it.last_ids)
    stream = [i for g in groups for i in g]
    assert stream == [f"g{i}" for i in range(GOOD)] and it.skipped.total == 5
    assert max(len(g) for g in groups) > spec.batch_size  # several examples share a row
    # Greedy: each batch holds the examples that fit in stream order, the first misfit opens the next.
    examples = _good_examples(data)
    plans = plan_batches([ExampleSize.of(examples[i]) for i in stream], spec)
    assert [tuple(stream[j] for j in sorted(p.order)) for p in plans] == groups
    _assert_same(batches, [pack_examples([examples[i] for i in g], spec) for g in groups])
    for b in batches:
        assert b["input_ids"].shape == (2, 192) and b["attention_mask"].max() >= 2
    # drop_remainder drops the batch that the end of the data closed.
    it = make_batches(data["sft"], data["ckpt"], spec, shuffle=False, pack=True, drop_remainder=True)
    assert _drain(it)[1] == [i for g in groups[:-1] for i in g]
    with pytest.raises(ValueError, match="packing is for SFT"):
        make_batches(data["dpo"], data["ckpt"], data["spec"], kind="dpo", pack=True)


def test_packed_checkpoint_restore_mid_stream(data):
    spec, kwargs = _pack_spec(data), dict(seed=7, num_epochs=None, pack=True)
    it = make_batches(data["sft"], data["ckpt"], spec, **kwargs)
    _take(it, 2)
    state = it.get_state()
    # The example that closed batch 2 has been pulled from grain and is held for batch 3, so the saved
    # grain state is the one from before it was pulled, not the loader's current state.
    assert json.loads(state)["grain"].encode() != it._it.get_state()
    a, a_ids = [], []
    for _ in range(4):
        a.append(next(it))
        a_ids.append(it.last_ids)
    restored = make_batches(data["sft"], data["ckpt"], spec, **kwargs)
    restored.set_state(state)
    b, b_ids = [], []
    for _ in range(4):
        b.append(next(restored))
        b_ids.append(restored.last_ids)
    assert a_ids == b_ids
    _assert_same(a, b)
    # The uninterrupted stream from the start: the restored batches are its batches 3 to 6.
    fresh = make_batches(data["sft"], data["ckpt"], spec, **kwargs)
    _take(fresh, 2)
    _assert_same(a, _take(fresh, 4))
