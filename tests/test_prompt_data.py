"""GRPO/PPO prompt records and the prompt iterator: formats, columns, encoding, grouping, skips, restore."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data.pipeline import make_batches
from qwenvl_jax.data.prompts import encode_prompt, make_prompt_batches
from qwenvl_jax.data.records import BadRecord, DPORecord, PromptRecord, SFTRecord, parse_line, read_jsonl
from qwenvl_jax.processing import BatchSpec, ExampleSize, Processor
from qwenvl_jax.tiny import write_tiny_checkpoint

GOOD = [f"p{i}" for i in range(7)]
BUDGET = dict(image_patches=48, max_images=4, video_patches=576, max_videos=1)


def _write(path: pathlib.Path, lines) -> pathlib.Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _user(*blocks):
    return [{"role": "user", "content": list(blocks)}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    (root / "img").mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "img/red.png")  # grid (1, 4, 4): 16 patch rows
    Image.new("RGB", (84, 56), (30, 30, 200)).save(root / "img/blue.png")  # grid (1, 4, 6): 24 patch rows
    (root / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (root / "clip").mkdir()  # a video as a directory of frames: grid (1, 24, 24), 576 patch rows
    for i in range(2):
        Image.new("RGB", (56, 56), (100 * i, 50, 0)).save(root / f"clip/{i}.png")
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    good = [
        {"id": "p0", "prompt": "What colour?", "image": "img/red.png", "solution": "red"},
        {"id": "p1", "prompt": _user(image, text("Compare"), image), "images": ["img/blue.png", "img/red.png"],
         "answer": "B", "meta": {"level": 2, "tags": ["x"]}},
        {"id": "p2", "prompt": "2 + 2 = ?", "solution": "4"},
        {"id": "p3", "prompt": "Left <image> right <image>. Which is red?", "images": ["img/red.png", "img/blue.png"],
         "answer": "left"},
        {"id": "p4", "prompt": "What moves?", "video": "clip", "solution": "nothing"},
        {"id": "p5", "prompt": _user(image, text("Shape?")), "images": ["img/blue.png"], "answer": "box"},
        {"id": "p6", "prompt": "Say hi.", "solution": "hi"},
    ]  # fmt: skip
    bad = [
        {"id": "missing", "prompt": "q", "image": "img/nope.png", "solution": "s"},
        {"id": "corrupt", "prompt": "q", "image": "img/corrupt.png", "solution": "s"},
        {"id": "long", "prompt": "the cat " * 200, "solution": "s"},
        {"id": "mismatch", "prompt": "<image> and <image>?", "images": ["img/red.png"], "solution": "s"},
        {"id": "sft", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    lines = good[:2] + bad[:2] + good[2:4] + bad[2:] + good[4:]
    prompts = _write(root / "prompts.jsonl", lines)
    processor = Processor.from_pretrained(ckpt)
    return {"root": root, "ckpt": ckpt, "prompts": prompts, "processor": processor}


def _drain(it):
    groups, ids = [], []
    for group in it:
        groups.append(group)
        ids.append(it.last_ids)
    return groups, ids


def _batches(data, **kwargs):
    options = dict(prompts_per_batch=3, max_prompt_length=256, shuffle=False, **BUDGET)
    return make_prompt_batches(data["prompts"], data["ckpt"], **{**options, **kwargs})


# ------------------------------------------------------------------------------------------- records
def test_prompt_records_fill_media_and_carry_columns(data):
    root = str(data["root"])
    records = {r.id: r for r in read_jsonl(data["prompts"]) if not isinstance(r, BadRecord)}
    assert [i for i in records if i.startswith("p")] == GOOD and isinstance(records["sft"], SFTRecord)
    p0, p1, p3, p4 = records["p0"], records["p1"], records["p3"], records["p4"]
    assert isinstance(p0, PromptRecord)
    # A string prompt: one user turn, the image before the text; the string is kept for the rewards.
    assert p0.prompt == _user(
        {"type": "image", "image": f"{root}/img/red.png"}, {"type": "text", "text": "What colour?"}
    )
    assert p0.text == p0.reward_prompt == "What colour?" and p0.columns == {"solution": "red"}
    # Messages: placeholders filled in order; every other key carried untouched.
    assert [b.get("image") for b in p1.prompt[0]["content"]] == [
        f"{root}/img/blue.png",
        None,
        f"{root}/img/red.png",
    ]
    assert p1.images == [f"{root}/img/blue.png", f"{root}/img/red.png"] and p1.text is None
    assert p1.reward_prompt is p1.prompt and p1.columns == {
        "answer": "B",
        "meta": {"level": 2, "tags": ["x"]},
    }
    # `<image>` placeholders in a string prompt put the images in their places.
    assert p3.prompt[0]["content"] == [
        {"type": "text", "text": "Left "}, {"type": "image", "image": f"{root}/img/red.png"},
        {"type": "text", "text": " right "}, {"type": "image", "image": f"{root}/img/blue.png"},
        {"type": "text", "text": ". Which is red?"},
    ]  # fmt: skip
    assert p4.videos == [f"{root}/clip"] and p4.prompt[0]["content"][0] == {
        "type": "video",
        "video": f"{root}/clip",
    }
    bad = [r for r in read_jsonl(data["prompts"]) if isinstance(r, BadRecord)]
    assert [(b.reason, b.record_id) for b in bad] == [("invalid", "mismatch")]
    assert "holds 2 <image> placeholders for 1 images" in bad[0].detail


def test_format_recognition_keeps_sft_and_dpo():
    kw = dict(path="/d/x.jsonl", line=3)
    dpo = {"prompt": "q", "chosen": "a", "rejected": "b"}
    assert isinstance(parse_line(json.dumps(dpo), **kw), DPORecord)
    sft = {
        "prompt": "ignored",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    assert isinstance(parse_line(json.dumps(sft), **kw), SFTRecord)
    rec = parse_line(json.dumps({"prompt": _user({"type": "video"}, {"type": "text", "text": "?"}),
                                 "videos": [["f/0.png", "f/1.png"]], "id": 7}), **kw)  # fmt: skip
    assert rec.id == "7" and rec.videos == [["/d/f/0.png", "/d/f/1.png"]] and rec.columns == {}
    # A DPO string prompt takes `<image>` placeholders too.
    rec = parse_line(json.dumps({**dpo, "prompt": "see <image> here", "image": "a.png"}), **kw)
    assert [b["type"] for b in rec.prompt[0]["content"]] == ["text", "image", "text"]


@pytest.mark.parametrize(
    "obj, needle",
    [
        ({"prompt": "<image>", "images": []}, "holds 1 <image> placeholders for 0 images"),
        ({"prompt": "<video> x", "images": ["a.png"]}, "<image> placeholders for 1 images"),
        ({"prompt": _user({"type": "image"})}, "more image placeholders"),
        (
            {"prompt": _user({"type": "text", "text": "q"}), "video": "v.mp4"},
            "0 video placeholders for 1 videos",
        ),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "assistant turn",
        ),
        ({"prompt": 3}, "'prompt' must be a non-empty list"),
        ({"prompt": "q", "videos": "v.mp4"}, "'videos' must be a list"),
        ({"problem": "q"}, "unknown record format"),
    ],
)
def test_invalid_prompt_records_name_id_and_line(obj, needle):
    with pytest.raises(BadRecord, match=needle) as err:
        parse_line(json.dumps({"id": "u", **obj}), path="/d/x.jsonl", line=2)
    assert (
        err.value.reason == "invalid" and err.value.location == "/d/x.jsonl:2" and err.value.record_id == "u"
    )


def test_column_mapping_renames_before_recognition():
    line = json.dumps({"id": "g", "problem": "<image>Find x.", "images": ["a.png"], "answer": "3"})
    rec = parse_line(line, path="/d/x.jsonl", line=1, columns={"prompt": "problem", "solution": "answer"})
    assert isinstance(rec, PromptRecord) and rec.columns == {"solution": "3"}
    assert rec.prompt == _user({"type": "image", "image": "/d/a.png"}, {"type": "text", "text": "Find x."})
    with pytest.raises(BadRecord, match=r"no column 'question' \(as 'prompt'\)") as err:
        parse_line(line, path="/d/x.jsonl", line=1, columns={"prompt": "question"})
    assert err.value.record_id == "g" and err.value.reason == "invalid"
    with pytest.raises(ValueError, match=r"data\.columns must map"):
        make_prompt_batches("unused.jsonl", "unused", prompts_per_batch=1, columns={"prompt": 3})


# ------------------------------------------------------------------------------------------ encoding
def test_encode_prompt_matches_encode_chat_with_generation_prompt(data):
    processor = data["processor"]
    records = {r.id: r for r in read_jsonl(data["prompts"]) if isinstance(r, PromptRecord)}
    for rid in ("p0", "p1", "p2", "p4"):
        rec = records[rid]
        ex = encode_prompt(processor, rec)
        ref = processor.encode_chat([rec.prompt], add_generation_prompt=True, padding=False)
        assert ex["input_ids"].ndim == 1
        np.testing.assert_array_equal(ex["input_ids"], ref["input_ids"][0])
        assert processor.tokenizer.decode(ex["input_ids"]).endswith("<|im_start|>assistant\n")
        vision = {k for k in ref if "pixel" in k or "grid" in k or "second" in k}
        assert {k for k in ex if k not in ("id", "location", "input_ids", "columns", "prompt")} == vision
        for key in vision:
            np.testing.assert_array_equal(ex[key], ref[key])
        assert ex["id"] == rid and ex["location"] == rec.location and ex["columns"] == rec.columns
    assert encode_prompt(processor, records["p0"])["prompt"] == "What colour?"
    assert encode_prompt(processor, records["p1"])["prompt"] == records["p1"].prompt
    assert encode_prompt(processor, records["p4"])["video_grid_thw"].tolist() == [[1, 24, 24]]
    n = encode_prompt(processor, records["p1"])["input_ids"].size
    with pytest.raises(BadRecord, match=f"{n} tokens, more than max_prompt_length={n - 1}") as err:
        encode_prompt(processor, records["p1"], max_prompt_length=n - 1)
    assert err.value.reason == "too_long"
    assert encode_prompt(processor, records["p1"], max_prompt_length=n)["input_ids"].size == n


# ---------------------------------------------------------------------------------------- iterating
def test_prompt_groups_fit_the_vision_budget(data):
    it = _batches(data)
    groups, ids = _drain(it)
    # 48 patch rows: p0 (16) + p1 (40) overflow, so p1 is held back and opens the next group, etc.
    assert ids == [("p0",), ("p1", "p2"), ("p3", "p4"), ("p5", "p6")]
    for group in groups:
        assert isinstance(group, list) and all(isinstance(ex, dict) for ex in group)
        total = sum((ExampleSize.of(ex) for ex in group), ExampleSize(0))
        assert total.image_patches <= 48 and total.images <= 4 and total.video_patches <= 576
    assert groups[1][0]["columns"]["meta"] == {"level": 2, "tags": ["x"]}
    assert it.skipped.counts == {"missing_image": 1, "corrupt_image": 1, "too_long": 1, "invalid": 2}
    assert (
        it.skipped.examples["invalid"][1].startswith("sft (")
        and "an SFT record in a GRPO" in it.skipped.examples["invalid"][1]
    )
    # A larger budget: groups of prompts_per_batch; the last one, closed by the end of data, comes short.
    wide = dict(image_patches=64, max_images=4, video_patches=576, max_videos=1)
    assert _drain(_batches(data, **wide))[1] == [("p0", "p1", "p2"), ("p3", "p4", "p5"), ("p6",)]
    assert _drain(_batches(data, drop_remainder=True, **wide))[1] == [("p0", "p1", "p2"), ("p3", "p4", "p5")]
    # make_batches(kind="grpo") is the same iterator with the budget in a BatchSpec.
    spec = BatchSpec(batch_size=3, seq_buckets=(256,), **BUDGET)
    same = make_batches(data["prompts"], data["ckpt"], spec, kind="ppo", shuffle=False)
    assert _drain(same)[1] == ids


def test_prompts_over_the_budget_alone_are_too_long(data, tmp_path):
    log = tmp_path / "skipped.jsonl"
    it = _batches(data, image_patches=32, video_patches=0, skip_log=log)
    ids = [i for g in _drain(it)[1] for i in g]
    assert ids == ["p0", "p2", "p5", "p6"]  # p1, p3 need 40 rows; p4 holds a video and there is no budget
    entries = {e["id"]: e for e in map(json.loads, log.read_text().splitlines())}
    assert set(entries) == {"p1", "p3", "p4", "missing", "corrupt", "long", "mismatch", "sft"}
    assert entries["p1"]["reason"] == "too_long" and "more than the budget 32" in entries["p1"]["detail"]
    assert entries["p4"]["detail"] == "holds videos but the batch spec has no video patch budget"
    assert entries["long"]["reason"] == "too_long" and "max_prompt_length=256" in entries["long"]["detail"]
    assert entries["p1"]["location"] == f"{data['prompts']}:2"


@pytest.mark.parametrize(
    "rid, reason, line", [("missing", "missing_image", 3), ("long", "too_long", 7), ("sft", "invalid", 9)]
)
def test_strict_policy_names_the_prompt(data, rid, reason, line):
    path = data["prompts"]
    lines = path.read_text().splitlines()
    one = _write(data["root"] / f"strict_{rid}.jsonl", [lines[0], lines[line - 1]])
    it = make_prompt_batches(
        one,
        data["ckpt"],
        prompts_per_batch=4,
        policy="strict",
        shuffle=False,
        max_prompt_length=256,
        **BUDGET,
    )
    with pytest.raises(BadRecord) as err:
        next(it)
    assert (err.value.reason, err.value.record_id, err.value.location) == (reason, rid, f"{one}:2")


def test_other_kinds_refuse_prompt_records(data):
    spec = BatchSpec(batch_size=2, seq_buckets=(256,), image_patches=64, video_patches=576)
    it = make_batches(data["prompts"], data["ckpt"], spec, kind="sft", shuffle=False)
    assert [i for i in _drain(it)[1] for i in i] == ["sft"]
    assert it.skipped.counts == {"invalid": 11}  # every prompt record (bad images or not) and the mismatch
    assert any("a prompt record in an SFT data set" in e for e in it.skipped.examples["invalid"])
    with pytest.raises(ValueError, match="packing is for SFT"):
        make_batches(data["prompts"], data["ckpt"], spec, kind="grpo", pack=True)
    with pytest.raises(ValueError, match="prompts_per_batch=0"):
        make_prompt_batches(data["prompts"], data["ckpt"], prompts_per_batch=0)


def _same_groups(a, b):
    assert len(a) == len(b)
    for ga, gb in zip(a, b, strict=True):
        assert [x["id"] for x in ga] == [y["id"] for y in gb]
        for x, y in zip(ga, gb, strict=True):
            assert x.keys() == y.keys() and x["columns"] == y["columns"] and x["prompt"] == y["prompt"]
            for k in x:
                if isinstance(x[k], np.ndarray):
                    assert x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes(), k


def test_restore_mid_stream_while_a_prompt_is_held(data, tmp_path):
    kwargs = dict(shuffle=True, seed=3, num_epochs=3)
    whole = _batches(data, skip_log=tmp_path / "whole.jsonl", **kwargs)
    all_groups = _drain(whole)[0]
    log = tmp_path / "run.jsonl"
    it = _batches(data, skip_log=log, **kwargs)
    # Save after a group closed by the budget (a prompt is held back) while some bad prompts were passed.
    k = 0
    while True:
        next(it)
        k += 1
        if it._held is not None and 0 < it.skipped.total < 5:
            break
    state = it.get_state()
    assert json.loads(state)["grain"].encode() != it._it.get_state()
    held = it._held[0]["example"]["id"]
    for _ in range(3):
        next(it)
    restored = _batches(data, skip_log=log, **kwargs)
    restored.set_state(state)
    rest = _drain(restored)[0]
    assert rest[0][0]["id"] == held
    _same_groups(all_groups[k:], rest)
    assert restored.skipped.counts == whole.skipped.counts and restored.skipped.total == 5
    assert log.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    # Not trivial: a fresh iterator starts elsewhere.
    assert next(_batches(data, **kwargs))[0]["id"] != held


def test_records_module_loads_without_jax():
    code = (
        "import sys, json; from qwenvl_jax.data.records import parse_line;"
        "parse_line(json.dumps({'prompt': 'q <image>', 'image': 'a.png', 'x': 1}), path='/a.jsonl', line=1);"
        "assert 'jax' not in sys.modules and 'grain' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
