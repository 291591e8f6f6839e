"""The Processor facade against transformers' Qwen2_5_VLProcessor (PIL backend): same keys, same values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.processing import InputError, Processor

RNG = np.random.default_rng(7)


def _image(h: int, w: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


IMAGES = [_image(150, 200), _image(224, 112), _image(300, 500), _image(40, 90, "RGBA"), _image(64, 64, "L")]


def _conversations():
    img = {"type": "image"}
    return [
        [
            {
                "role": "user",
                "content": [
                    img,
                    {"type": "text", "text": "Describe."},
                    img,
                    {"type": "text", "text": "Compare."},
                ],
            },
            {"role": "assistant", "content": "The first is larger."},
            {"role": "user", "content": "and the colours?"},
        ],
        [{"role": "user", "content": [{"type": "text", "text": "Only one:"}, img]}],
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [img, img, {"type": "text", "text": "Which is grey? Réponds en français 🙂"}],
            },
        ],
    ]


@pytest.fixture(scope="module", params=["tiny", "real"])
def pair(request, tiny_ckpt, real_ckpt, hf_tiny, hf_real):
    ckpt, hf = (tiny_ckpt, hf_tiny) if request.param == "tiny" else (real_ckpt, hf_real)
    return Processor.from_pretrained(ckpt), hf


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_hf(pair, padding_side):
    ours, hf = pair
    convs = _conversations()
    texts = [hf.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    assert ours.apply_chat_template(convs, add_generation_prompt=True) == texts
    ref = hf(text=texts, images=IMAGES, padding=True, padding_side=padding_side, return_tensors="np")
    got = ours(text=texts, images=IMAGES, padding=True, padding_side=padding_side)
    assert sorted(got) == sorted(ref.keys())
    for key in ref:
        assert got[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_nested_images_per_sample_mean_the_same_order(pair):
    ours, _ = pair
    texts = ours.apply_chat_template(_conversations(), add_generation_prompt=True)
    flat = ours(text=texts, images=IMAGES, padding=True)
    nested = ours(text=texts, images=[IMAGES[:2], IMAGES[2:3], IMAGES[3:]], padding=True)
    for key in flat:
        np.testing.assert_array_equal(flat[key], nested[key])


def test_text_only_has_no_vision_keys(pair):
    ours, hf = pair
    texts = ["hello there", "a longer prompt, with punctuation!"]
    ref = hf(text=texts, padding=True, return_tensors="np")
    got = ours(text=texts, padding=True)
    assert sorted(got) == sorted(ref.keys())
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


def test_encode_chat_equals_template_then_processor(pair):
    """Media named in the content blocks go through the same path as HF's two-step call."""
    ours, hf = pair
    convs = _conversations()
    # Put the images into the blocks, in template order.
    it = iter(IMAGES)
    for conv in convs:
        for msg in conv:
            if isinstance(msg["content"], list):
                msg["content"] = [
                    dict(b, image=next(it)) if b.get("type") == "image" else b for b in msg["content"]
                ]
    got = ours.encode_chat(convs, add_generation_prompt=True, padding_side="left")
    texts = [hf.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    ref = hf(text=texts, images=IMAGES, padding=True, padding_side="left", return_tensors="np")
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_assistant_only_labels(pair):
    ours, _ = pair
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A noisy picture."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, quite sure."}]},
    ]
    out = ours.encode_chat([conv], labels=True)
    ids, labels = out["input_ids"][0], out["labels"][0]
    kept = labels != -100
    assert np.array_equal(labels[kept], ids[kept])
    tok = ours.tokenizer
    assert tok.decode(labels[kept].tolist()) == "A noisy picture.<|im_end|>\nYes, quite sure.<|im_end|>\n"
    # The `<|im_start|>assistant\n` cue and everything before the first answer are masked.
    first = int(np.flatnonzero(kept)[0])
    assert tok.decode(ids[:first].tolist()).endswith("<|im_start|>assistant\n")


def test_mask_vision_tokens_in_labels(pair):
    ours, _ = pair
    conv = [
        {"role": "user", "content": "Draw it."},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Here:"}, {"type": "image", "image": IMAGES[1]}],
        },
    ]
    plain = ours.encode_chat([conv], labels=True)
    masked = ours.encode_chat([conv], labels=True, mask_vision_tokens=True)
    vision = np.isin(
        plain["input_ids"][0], [ours.image_token_id, ours.vision_start_token_id, ours.vision_end_token_id]
    )
    assert (plain["labels"][0][vision] != -100).all()
    assert (masked["labels"][0][vision] == -100).all()
    assert np.array_equal(masked["labels"][0][~vision], plain["labels"][0][~vision])


def test_placeholder_count_mismatch_is_refused(pair):
    ours, hf = pair
    text = ours.apply_chat_template(_conversations()[1])
    with pytest.raises(InputError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        ours(text=[text], images=IMAGES[:2])
    with pytest.raises(ValueError):  # HF refuses too: same contract
        hf(text=[text], images=IMAGES[:2])


def test_unequal_lengths_need_padding(pair):
    ours, _ = pair
    with pytest.raises(InputError, match="padding=True"):
        ours(text=["a", "a much longer text"])


def test_truncation_never_cuts_an_image(pair):
    ours, _ = pair
    text = ours.apply_chat_template(_conversations()[1])
    full = ours(text=[text], images=IMAGES[:1])["input_ids"][0]
    start = int(np.flatnonzero(full == ours.vision_start_token_id)[0])
    with pytest.raises(InputError, match="cut through an image"):
        ours(text=[text], images=IMAGES[:1], truncation=True, max_length=start + 3)
    cut = ours(text=[text], images=IMAGES[:1], truncation=True, max_length=len(full) - 1)["input_ids"][0]
    np.testing.assert_array_equal(cut, full[:-1])


def test_bad_image_in_a_conversation_is_named(pair, tmp_path):
    ours, _ = pair
    missing = tmp_path / "nope.png"
    conv = [
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGES[0]}, {"type": "image", "image": str(missing)}],
        }
    ]
    with pytest.raises(InputError, match=r"nope\.png"):
        ours.encode_chat([conv])


def test_from_pretrained_refuses_missing_dir(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        Processor.from_pretrained(tmp_path / "absent")


def test_video_placeholders_expand_and_typed(tiny_ckpt):
    ours = Processor.from_pretrained(tiny_ckpt)
    frames = [np.asarray(_image(56, 112)) for _ in range(5)]
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames, "sample_fps": 2.0, "min_pixels": 3136},
                {"type": "image", "image": IMAGES[1]},
            ],
        }
    ]
    out = ours.encode_chat([conv])
    t, h, w = out["video_grid_thw"][0]
    assert (t, h, w) == (3, 4, 8)  # 5 frames padded to 6, 56x112 px kept by min_pixels 3136
    assert (out["input_ids"] == ours.video_token_id).sum() == t * h * w // 4
    assert out["pixel_values_videos"].shape == (t * h * w, 1176)
    np.testing.assert_array_equal(out["mm_token_type_ids"] == 2, out["input_ids"] == ours.video_token_id)
    assert out["second_per_grid_ts"].tolist() == [1.0]  # temporal_patch_size / 2 fps
