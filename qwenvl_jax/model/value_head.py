"""The scalar head of reward (and, later, value) models: its own small parameter tree, like LoRA's.

transformers' sequence classifiers (`GenericForSequenceClassification`, which
`Qwen2_5_VLForSequenceClassification` would be; transformers 5.24 ships none for Qwen2.5-VL) put
`score = nn.Linear(hidden, num_labels, bias=False)` on the final-norm hidden states and read it at the
LAST NON-PAD TOKEN of each row: `argmax(arange(S) * (input_ids != pad))`, the rightmost token whose id is
not the pad id, which serves right- and left-padded rows alike. Here:

    head = {"kernel": W_dn}        # (hidden, num_labels), no bias; HF `score.weight` is W_dn.T
    score_bn = h_bsd[b, last_b] @ W_dn       (float32)

The head lives beside the backbone's params under the key `"score"` (`SCORE`), so a train state's
params are `{**backbone_or_lora, "score": head}` and a saved model is the backbone's flat params plus
`score/kernel`. Initialisation mirrors transformers' `_init_weights` for a missing `score` (what TRL's
RewardTrainer gets): N(0, initializer_range = 0.02); `std=0` gives a zero head (every reward 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

SCORE = "score"  # the head's key in a params tree (HF: `score.weight`)
VALUE = "value"  # a PPO state's value-model backbone (full tree or adapters), beside the policy's params
HEAD_LOGICAL_AXES = ("embed", None)  # the kernel's (hidden, num_labels) axes, for shardings
INIT_STD = 0.02  # transformers' `initializer_range` default, its init of a missing `score.weight`


def init_head(hidden_size: int, key: jax.Array, *, std: float = INIT_STD, num_labels: int = 1) -> dict:
    """`{"kernel": (hidden, num_labels)}` ~ N(0, std^2), float32 (trained master weights); std=0: zeros."""
    if std == 0:
        return {"kernel": jnp.zeros((hidden_size, num_labels), jnp.float32)}
    return {"kernel": std * jax.random.normal(key, (hidden_size, num_labels), jnp.float32)}


def last_token_index(input_ids_bs: jax.Array, pad_token_id: int) -> jax.Array:
    """`(B,)` index of each row's rightmost non-pad token (transformers' sequence classifier; 0 for an
    all-pad row)."""
    seq = input_ids_bs.shape[-1]
    not_pad = (input_ids_bs != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(seq, dtype=jnp.int32) * not_pad, axis=-1)


def head_scores(head: Mapping[str, Any], h_bsd: jax.Array, index_b: jax.Array) -> jax.Array:
    """`(B, num_labels)` float32: the head on the hidden state at `index_b` of each row. Only the picked
    rows are projected (B x D, never B x S x D)."""
    h_bd = jnp.take_along_axis(h_bsd, index_b[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bd,dn->bn", h_bd.astype(jnp.float32), head["kernel"].astype(jnp.float32))


def reward_scores(model, head: Mapping[str, Any], batch: Mapping[str, jax.Array], pad_token_id: int):
    """`(B,)` rewards of a batch (`CORE_KEYS` of `collate`): the single-label head at the last non-pad
    token of the final-norm hidden states."""
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS

    h_bsd = model.hidden_states(**{k: batch[k] for k in CORE_KEYS if k in batch})
    return head_scores(head, h_bsd, last_token_index(batch["input_ids"], pad_token_id))[:, 0]
