"""Model configuration: frozen dataclasses, named presets, and the HF `config.json` round trip.

HF hazards handled here (spec 1.2):
- The Hub's `config.json` is flat (text fields at the top level, `vision_config` nested); configs saved by
  transformers 5 are nested (`text_config`). Both are read; the nested form is written.
- Missing keys take transformers' class defaults, and some of those are not the published values
  (vision `hidden_size` 3584, `tokens_per_second` 4, text `rms_norm_eps` 1e-5). We use the same
  defaults so that a trimmed config means what it means to transformers.
- `rope_scaling` (old name) and `rope_parameters` both carry `mrope_section`; `rope_theta` may sit at the
  top level or inside them.
- `tie_word_embeddings` may sit in `text_config` (old v4 saves) or at the top level.
- Legacy vision keys `in_chans` and `spatial_patch_size` are ignored, as transformers ignores them.
- `eos_token_id` may be one id or a list (and Qwen checkpoints list more stop ids in
  `generation_config.json`): all of them are kept, as a tuple; a single id is written back as an int.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 3584  # transformers' class default; every checkpoint says 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: float = 4  # class default; checkpoints say 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # hard-coded in HF's vision tower
    rope_theta: float = 10000.0  # not configurable in HF (axial rope default)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5  # class default; checkpoints say 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # q/k/v have biases, o_proj has none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        # HF does not check this; a wrong section silently rotates the wrong dims (spec 1.2).
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"sum(mrope_section)={sum(self.mrope_section)} must equal head_dim/2={self.head_dim // 2}"
            )


# `model.attention`'s backends: "xla" (reference, any platform), "cudnn" (GPU), "splash" (TPU), and their
# CPU-testable twins "dpa_xla" (the cuDNN call's arguments on XLA) and "splash_interpret" (the Pallas
# interpreter).
ATTENTION_BACKENDS = ("xla", "cudnn", "dpa_xla", "splash", "splash_interpret")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The architecture (from `config.json`) plus the run-time numerics policy (ours, not HF's)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int = 151643
    eos_token_id: tuple[int, ...] = (151645,)  # every id generation stops on (an int is taken as one)
    # Numerics and execution policy.
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of parameters (cast to `dtype` at use)
    attention_backend: str = "xla"  # one of ATTENTION_BACKENDS
    remat: str = "none"  # "none", "full" (recompute each layer) or "dots" (save matmul outputs)
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", _token_ids(self.eos_token_id, "eos_token_id"))
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal text hidden_size "
                f"{self.text.hidden_size}"
            )

    def replace(self, **changes: Any) -> Qwen25VLConfig:
        return dataclasses.replace(self, **changes)

    def with_eos_token_ids(self, ids: int | Sequence[int] | None) -> Qwen25VLConfig:
        """This config with `ids` added to its stop ids: ours first, then the new ones, in order."""
        new = [i for i in dict.fromkeys(_token_ids(ids, "eos_token_id")) if i not in self.eos_token_id]
        return self.replace(eos_token_id=(*self.eos_token_id, *new)) if new else self

    # ------------------------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **policy: Any) -> Qwen25VLConfig:
        """Parse an HF Qwen2.5-VL `config.json` (flat or nested form) with transformers' defaults."""
        hf = dict(hf)
        # transformers reads the text fields from `text_config` when it is present and from the top level
        # (the flat Hub form) only when it is absent; top-level text keys beside a `text_config` are ignored.
        if hf.get("text_config") is None:
            text_keys = {f.name for f in dataclasses.fields(TextConfig)} | {"rope_parameters", "rope_scaling"}
            text_src = {k: v for k, v in hf.items() if k in text_keys}
        else:
            text_src = dict(hf["text_config"])
        # Pre-v5 saves put the tie flag inside text_config; the outer flag wins only when it is set.
        text_src["tie_word_embeddings"] = bool(
            hf.get("tie_word_embeddings") or text_src.get("tie_word_embeddings")
        )
        rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
        if "mrope_section" in rope:
            text_src["mrope_section"] = rope["mrope_section"]
        if "rope_theta" not in text_src and rope.get("rope_theta") is not None:
            text_src["rope_theta"] = rope["rope_theta"]
        text = _build(TextConfig, text_src)
        vision = _build(VisionConfig, dict(hf.get("vision_config") or {}))
        top = {k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                  "vision_token_id", "bos_token_id", "eos_token_id") if hf.get(k) is not None}  # fmt: skip
        for key in ("bos_token_id", "eos_token_id"):
            if key not in top and text_src.get(key) is not None:
                top[key] = text_src[key]
        return cls(vision=vision, text=text, **top, **policy)

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested transformers 5 form; `from_hf_dict(to_hf_dict())` reproduces the architecture."""
        text = {f.name: getattr(self.text, f.name) for f in dataclasses.fields(TextConfig)}
        text.pop("mrope_section")
        text.pop("attention_bias")
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": list(self.text.mrope_section),
                                   "rope_theta": self.text.rope_theta}  # fmt: skip
        text["model_type"] = "qwen2_5_vl_text"
        # One id is written as transformers writes it (an int), any other number as a list.
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        text["bos_token_id"], text["eos_token_id"] = self.bos_token_id, eos
        vision = {f.name: getattr(self.vision, f.name) for f in dataclasses.fields(VisionConfig)}
        for key in ("rms_norm_eps", "rope_theta"):  # not HF config keys
            vision.pop(key)
        vision["fullatt_block_indexes"] = list(self.vision.fullatt_block_indexes)
        vision["model_type"] = "qwen2_5_vl"
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": vision,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
        }

    @classmethod
    def from_pretrained(cls, directory: str | Path, **policy: Any) -> Qwen25VLConfig:
        path = Path(directory) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
        return cls.from_hf_dict(json.loads(path.read_text(encoding="utf-8")), **policy)

    def save_pretrained(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def preset(cls, name: str, **policy: Any) -> Qwen25VLConfig:
        try:
            return PRESETS[name].replace(**policy)
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    """An HF token-id field (one id, a list of ids, or None) as a tuple of ints."""
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else (value,)
    try:
        if any(isinstance(v, bool) for v in values):
            raise TypeError
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{name} must be a token id or a list of token ids, got {value!r}") from None


def generation_eos_token_ids(directory: str | Path) -> tuple[int, ...]:
    """The `eos_token_id` (one id or a list) of `generation_config.json` in `directory`; () when absent.

    transformers' `generate` stops on these ids, which may go beyond config.json's (Qwen2.5-VL: config.json
    says `<|im_end|>`, generation_config.json adds `<|endoftext|>`)."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        return _token_ids(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"), "eos_token_id")
    except (UnicodeDecodeError, AttributeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a generation config with usable eos_token_id ({err})") from None


def _build(kind, src: Mapping[str, Any]):
    names = {f.name: f for f in dataclasses.fields(kind)}
    values = {}
    for key, value in src.items():
        if key not in names:
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return kind(**values)


def _preset(hidden, layers, heads, kv_heads, inter, vocab, tied, vision_inter) -> Qwen25VLConfig:
    return Qwen25VLConfig(
        vision=VisionConfig(hidden_size=1280, intermediate_size=vision_inter, out_hidden_size=hidden, tokens_per_second=2),
        text=TextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
            max_position_embeddings=128000, tie_word_embeddings=tied,
        ),
    )  # fmt: skip


# Published values (spec 1.1). The 72B intermediate size is the bf16 checkpoint's (29568), not AWQ's.
PRESETS: dict[str, Qwen25VLConfig] = {
    "3B": _preset(2048, 36, 16, 2, 11008, 151936, True, 3420),
    "7B": _preset(3584, 28, 28, 4, 18944, 152064, False, 3420),
    "32B": _preset(5120, 64, 40, 8, 27648, 152064, False, 3456),
    "72B": _preset(8192, 80, 64, 8, 29568, 152064, False, 3456),
    # The test recipe's tiny model (spec 7): token ids of the 342-token tiny tokenizer.
    "tiny": Qwen25VLConfig(
        vision=VisionConfig(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            fullatt_block_indexes=(1, 3),
            out_hidden_size=64,
            tokens_per_second=2,
        ),
        text=TextConfig(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
        ),
        image_token_id=332,
        video_token_id=333,
        vision_start_token_id=329,
        vision_end_token_id=330,
        vision_token_id=331,
        bos_token_id=320,
        eos_token_id=(322,),
    ),
}
