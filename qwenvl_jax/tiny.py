"""A tiny, fully offline Qwen2.5-VL checkpoint directory for demos and smoke runs.

Trains the 320-token byte-level BPE of the test recipe (Qwen2 split regex, NFC, byte-level alphabet) with
the `tokenizers` library alone, adds the 22 Qwen2.5 added tokens in Qwen order (`<|image_pad|>` = 332),
and writes `tokenizer.json`, `tokenizer_config.json`, `chat_template.json` and `preprocessor_config.json`
like a Hub directory. No network, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenvl_jax.processing.chat import default_chat_template
from qwenvl_jax.processing.tokenizer import PRETOKENIZE_REGEX

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

CORPUS = (
    "You are a helpful assistant.",
    "Describe this image in detail. What is shown in the picture?",
    "The cat sits on the mat next to a red ball and a blue box.",
    "Compare the two images and list the differences between them.",
    "A video of a dog running in the park, then jumping over a fence.",
    "Answer: the triangle is green, the circle is yellow, and the square is purple.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2026-11-24",
    "Hello, world! How are you today? I'm fine, thanks. Let's go.",
    "Qwen2.5-VL reads documents, charts, tables and handwriting.",
    "Ünïcödé àccents, emoji 🙂 and CJK 你好 世界 are bytes too.",
)


def build_tiny_tokenizer():
    """The 342-token tokenizer as a `tokenizers.Tokenizer` (deterministic: same vocab on every run)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def write_tiny_checkpoint(out: str | Path, *, max_pixels: int = 28 * 28 * 256) -> Path:
    """Write the processor files of a tiny Qwen2.5-VL checkpoint into `out` and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": default_chat_template()}, indent=2), encoding="utf-8"
    )
    pre = {
        "min_pixels": 3136,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
    return out


def write_tiny_model(out: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """A complete tiny HF checkpoint directory in `out`: random weights (`loading.random_model` of the
    "tiny" preset, float32 `model.safetensors`), `config.json` and the processor files above. No torch, no
    downloads: every command that takes an HF directory (`convert`, `generate`, `parity`, `train` with
    `model.path`) accepts it."""
    import tempfile

    from flax import nnx

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.loading import random_model
    from qwenvl_jax.weights import flatten_params, write_hf_checkpoint

    config = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    params = flatten_params(nnx.to_pure_dict(nnx.state(random_model(config, seed), nnx.Param)))
    with tempfile.TemporaryDirectory() as assets:
        write_tiny_checkpoint(assets)
        return write_hf_checkpoint(
            params, config, out, dtype="float32", assets_from=assets, overwrite=overwrite
        )
