"""The optimizer: AdamW with warmup + cosine/linear/constant decay, global-norm clipping and two masks.

Parameters are plain nested dicts (`nnx.to_pure_dict` of a split model) or the flat LoRA dict
`{"text/layers/self_attn/q_proj/kernel": {"a": A, "b": B}}`; masks are computed from the key paths.

Weight decay (decoupled, AdamW) follows transformers' `Trainer.get_decay_parameter_names` exactly, so TRL
runs are reproduced. transformers decides by NAME, not by layer kind: a parameter is exempt when its
lower-cased dotted name matches `bias`, `layernorm`, `rmsnorm`, a whole `norm` component or `_norm`
(`NO_DECAY_PATTERNS`), or sits inside an `nn.LayerNorm` (Qwen2.5-VL has none: all its norms are RMSNorm).
Our module names are transformers' (only leaf names differ: kernel/scale/embedding for weight), so the
patterns apply to our paths with `/` for `.`. Hence the text norms (`input_layernorm`,
`post_attention_layernorm`, `norm`) and every bias are exempt, while the vision blocks' `norm1`/`norm2`,
the merger's `ln_q`, embeddings, the lm_head and LoRA A/B matrices decay.

`trainable_mask` (optional): a tree of bools like the params; False leaves get `optax.set_to_zero()`
updates and no optimizer moments. The train steps of `qwenvl_jax.train.step` do not need it (they
differentiate only the trainable split of the parameters); it exists for callers who keep one tree.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal

import jax
import optax

from qwenvl_jax.quant import is_nf4

# transformers 5.24 `Trainer.get_decay_parameter_names`, verbatim (matched on the lower-cased dotted name).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = tuple(re.compile(p) for p in NO_DECAY_PATTERNS)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.0  # final lr = learning_rate * end_lr_ratio (cosine, linear)
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping


def key_path_str(path: tuple[Any, ...]) -> str:
    """`"a/b/c"` from a jax key path of nested dicts (the joined dict keys)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`jax.tree.map` with the `"a/b/c"` path string of each leaf. A quantized kernel
    (`quant.NF4Weight`) is one leaf: `fn` gets it whole, under the kernel's path."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(key_path_str(p), x), tree, is_leaf=is_nf4)


def decays(path: str) -> bool:
    """True when the parameter at `path` gets weight decay (see the module docstring). LoRA factors
    (`.../kernel/a`, `.../kernel/b`) decay like PEFT's `lora_A`/`lora_B` under transformers."""
    name = path.replace("/", ".").lower()
    return not any(p.search(name) for p in _NO_DECAY)


def decay_mask(params: Any) -> Any:
    return map_with_path(lambda p, _: decays(p), params)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then the decay over the rest."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, trainable_mask: Any = None) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (decay masked by `decay_mask`), optionally frozen by `trainable_mask`.

    The gradient norm is that of the trainable gradients only (frozen ones are zeroed before clipping).
    """
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if trainable_mask is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
