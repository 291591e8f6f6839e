"""Parquet input for every kind: rows as records, image structs, column mapping, mixed files, restore."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qwenvl_jax.data.parquet import ParquetSource, normalize_row, parse_row
from qwenvl_jax.data.pipeline import encode_dpo, encode_sft, make_batches
from qwenvl_jax.data.prompts import encode_prompt, make_prompt_batches
from qwenvl_jax.data.records import BadRecord, DPORecord, PromptRecord, SFTRecord, parse_line
from qwenvl_jax.processing import BatchSpec, InputError, Processor
from qwenvl_jax.tiny import write_tiny_checkpoint

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BLOCK = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(BLOCK))]))


def _png(size, colour) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _user_turn(n_images: int, text: str) -> dict:
    blocks = [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": text}]
    return {"role": "user", "content": blocks}


def _write(path: pathlib.Path, lines) -> pathlib.Path:
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    red, blue = _png((56, 56), (200, 30, 30)), _png((84, 56), (30, 30, 200))
    (root / "img").mkdir()
    (root / "img/red.png").write_bytes(red)
    (root / "img/blue.png").write_bytes(blue)
    # SFT, conversational, as `datasets` writes it: text blocks carry a null image, image blocks a null text.
    sft_rows = [
        {"messages": [_user_turn(1, "Describe"), {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
         "images": [{"bytes": red, "path": "red.png"}]},
        {"messages": [_user_turn(2, "Compare"), {"role": "assistant", "content": [{"type": "text", "text": "Blue, red."}]}],
         "images": [{"bytes": blue, "path": None}, {"bytes": None, "path": "img/red.png"}]},  # path: relative
        {"messages": [_user_turn(1, "Broken"), {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
         "images": [{"bytes": b"\x89PNG garbage", "path": "bad.png"}]},
        {"messages": [_user_turn(0, "Hi"), {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
         "images": []},
    ]  # fmt: skip
    schema = pa.schema([("messages", MESSAGES), ("images", pa.list_(IMAGE))])
    sft = root / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(sft_rows, schema=schema), sft, row_group_size=2)
    # DPO (RLAIF-V style) with one `image` struct per row and an id column.
    dpo_rows = [
        {"id": "d0", "image": {"bytes": red, "path": None}, "prompt": "Colour?", "chosen": "Red.", "rejected": "Green."},
        {"id": None, "image": {"bytes": None, "path": "img/blue.png"}, "prompt": "And this?", "chosen": "Blue.",
         "rejected": "Red."},
    ]  # fmt: skip
    dpo = root / "dpo.parquet"
    pq.write_table(pa.Table.from_pylist(dpo_rows), dpo)
    # GRPO in the hiyouga/geometry3k layout: `images`, `problem` with `<image>`, `answer`.
    geo_rows = [
        {"images": [{"bytes": red, "path": None}], "problem": "<image>Find x.", "answer": "3"},
        {"images": [{"bytes": blue, "path": None}, {"bytes": red, "path": None}],
         "problem": "Compare <image> with <image>.", "answer": "4"},
        {"images": [], "problem": "1 + 1?", "answer": "2"},
        {"images": [{"bytes": None, "path": None}], "problem": "<image>Empty struct.", "answer": "0"},
        {"images": [{"bytes": blue, "path": None}], "problem": "<image>Area?", "answer": "12"},
    ]  # fmt: skip
    geo = root / "geo.parquet"
    pq.write_table(pa.Table.from_pylist(geo_rows), geo, row_group_size=2)
    processor = Processor.from_pretrained(ckpt)
    spec = BatchSpec(
        batch_size=2, seq_buckets=(64, 128), image_patches=128, max_images=4,
        pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )  # fmt: skip
    return {
        "root": root,
        "ckpt": ckpt,
        "processor": processor,
        "spec": spec,
        "sft": sft,
        "dpo": dpo,
        "geo": geo,
    }


def _records(path, **kwargs):
    source = ParquetSource(path)
    out = []
    for i in range(len(source)):
        try:
            out.append(parse_row(source[i], **kwargs))
        except BadRecord as err:
            out.append(err)
    return out


def _drain(it):
    batches, ids = [], []
    for batch in it:
        batches.append(batch)
        ids.extend(it.last_ids)
    return batches, ids


# ------------------------------------------------------------------------------------------- records
def test_sft_rows_become_the_records_of_equivalent_jsonl_lines(data, tmp_path):
    sft, root = str(data["sft"]), data["root"]
    records = _records(sft)
    assert [r.id for r in records] == [f"{sft}:{i}" for i in (1, 2, 3, 4)]
    assert all(isinstance(r, SFTRecord) for r in records)
    # Null struct fields are gone: a text block is not taken for an image block.
    assert records[3].messages[0]["content"] == [{"type": "text", "text": "Hi"}]
    images = [b["image"] for b in records[1].messages[0]["content"] if b["type"] == "image"]
    assert images == [(root / "img/blue.png").read_bytes(), str(root / "img/red.png")]
    # The same conversation from a JSONL line with image files encodes to the same arrays.
    user = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare"}]
    line = {
        "messages": [{"role": "user", "content": user}, records[1].messages[1]],
        "images": ["img/blue.png", "img/red.png"],
    }
    jsonl = _write(root / "same.jsonl", [line])
    a = encode_sft(data["processor"], records[1])
    b = encode_sft(data["processor"], parse_line(jsonl.read_text(), path=str(jsonl), line=1))
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(a[key], b[key])


def test_dpo_and_prompt_rows(data):
    d0, d1 = _records(data["dpo"])
    assert isinstance(d0, DPORecord) and d0.id == "d0" and d1.id == f"{data['dpo']}:2"
    assert d0.images == [(data["root"] / "img/red.png").read_bytes()]
    assert d1.images == [str(data["root"] / "img/blue.png")]
    chosen, rejected = encode_dpo(data["processor"], d0)
    assert chosen["pixel_values"] is rejected["pixel_values"] and chosen["image_grid_thw"].tolist() == [
        [1, 4, 4]
    ]
    geo = _records(data["geo"], columns={"prompt": "problem"})
    assert [type(r).__name__ for r in geo] == ["PromptRecord"] * 3 + ["BadRecord", "PromptRecord"]
    g1 = geo[1]
    assert (
        isinstance(g1, PromptRecord)
        and g1.columns == {"answer": "4"}
        and g1.text == "Compare <image> with <image>."
    )
    assert [b["type"] for b in g1.prompt[0]["content"]] == ["text", "image", "text", "image", "text"]
    ex = encode_prompt(data["processor"], g1)
    assert ex["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4]] and ex["prompt"] == g1.text
    bad = geo[3]
    assert (
        bad.reason == "invalid"
        and bad.location == f"{data['geo']}:4"
        and "neither bytes nor a path" in bad.detail
    )
    # Without the mapping the rows are no known format.
    unmapped = _records(data["geo"])
    assert all(isinstance(r, BadRecord) and "unknown record format" in r.detail for r in unmapped[:3])


def test_normalize_row_keeps_reward_columns_as_stored():
    row = {"prompt": "q", "image": None, "answer": None, "meta": {"a": None}, "id": None}
    assert normalize_row(row, "/d") == {"prompt": "q", "answer": None, "meta": {"a": None}}


# ------------------------------------------------------------------------------------------ pipeline
def test_sft_and_dpo_batches_from_parquet_and_jsonl(data):
    jsonl = _write(
        data["root"] / "more.jsonl", [{"id": "j0", "image": "img/red.png", "prefix": "P", "suffix": "S"}]
    )
    it = make_batches([data["sft"], jsonl], data["ckpt"], data["spec"], shuffle=False)
    batches, ids = _drain(it)
    sft = str(data["sft"])
    assert ids == [f"{sft}:1", f"{sft}:2", f"{sft}:4", "j0"]
    assert it.skipped.counts == {"corrupt_image": 1}
    assert it.skipped.examples["corrupt_image"][0].startswith(f"{sft}:3 ({sft}:3): ")
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]
    spec = BatchSpec(**{**data["spec"].__dict__, "batch_size": 4})
    it = make_batches(data["dpo"], data["ckpt"], spec, kind="dpo", shuffle=False)
    assert _drain(it)[1] == ["d0", f"{data['dpo']}:2"]
    with pytest.raises(BadRecord, match=rf"record {sft}:3 \({sft}:3\): corrupt_image"):
        _drain(make_batches(data["sft"], data["ckpt"], data["spec"], shuffle=False, policy="strict"))


def test_prompt_batches_from_a_hub_layout(data):
    options = dict(
        prompts_per_batch=2, image_patches=48, max_images=4, shuffle=False, columns={"prompt": "problem"}
    )
    it = make_prompt_batches(data["geo"], data["ckpt"], **options)
    groups, ids = [], []
    for group in it:
        groups.append(group)
        ids.append(tuple(it.last_ids))
    geo = str(data["geo"])
    # Row 2 needs 40 patch rows: it does not fit after row 1 (16) and opens the next group.
    assert ids == [(f"{geo}:1",), (f"{geo}:2", f"{geo}:3"), (f"{geo}:5",)]
    assert groups[0][0]["columns"] == {"answer": "3"} and groups[0][0]["prompt"] == "<image>Find x."
    assert it.skipped.counts == {"invalid": 1}


def test_parquet_restore_is_exact_and_workers_agree(data):
    kwargs = dict(seed=1, num_epochs=None)
    paths = [data["sft"], data["sft"]]  # 8 rows, 2 row groups a file

    def take(it, n):
        return [next(it) for _ in range(n)]

    it = make_batches(paths, data["ckpt"], data["spec"], **kwargs)
    first = take(it, 3)
    state = it.get_state()
    a = take(it, 4)
    restored = make_batches(paths, data["ckpt"], data["spec"], **kwargs)
    restored.set_state(state)
    b = take(restored, 4)
    # Worker processes read the rows from a pickled source: the same stream from the start.
    c = take(make_batches(paths, data["ckpt"], data["spec"], worker_count=1, **kwargs), 7)
    for x, y, z in zip(first + a, first + b, c, strict=True):
        for key in x:
            assert x[key].tobytes() == y[key].tobytes() == z[key].tobytes(), key


def test_unreadable_files_and_missing_columns_are_refused_by_name(data, tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=f"^{junk}: not a readable Parquet file"):
        make_batches([data["sft"], junk], data["ckpt"], data["spec"])
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(InputError, match=f"^{empty}: no records"):
        make_prompt_batches(empty, data["ckpt"], prompts_per_batch=1)
    with pytest.raises(InputError, match=rf"^{data['geo']}: no column 'question' \(as 'prompt'\)"):
        make_prompt_batches(data["geo"], data["ckpt"], prompts_per_batch=1, columns={"prompt": "question"})
    with pytest.raises(IndexError):
        ParquetSource(data["geo"])[5]
