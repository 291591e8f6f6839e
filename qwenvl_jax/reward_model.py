"""`load_reward_model(path)`: a reward model's checkpoint -> `(Qwen25VL backbone, head)`.

A reward run's `final/` (Orbax: the backbone's params plus `score/kernel`) or its `qwenvl-jax export`
(HF sequence classifier: `score.weight`). The head is `model.value_head`'s tree `{"kernel": (hidden, 1)}`
in float32; score rows with `value_head.reward_scores(model, head, batch, pad_token_id)`. This is the
reward (and value) model that PPO reads. `qwenvl_jax.load` refuses these checkpoints (`score/kernel` is
not a parameter of the generative model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from qwenvl_jax.weights import SCORE, SCORE_PATH, CheckpointMismatchError, normalize_hf_key


def load_reward_model(
    path: str | Path, *, dtype: str = "bfloat16", param_dtype: str | None = None, **policy: Any
) -> tuple[Any, dict]:
    """`(model, head)` of a reward checkpoint; arguments as `qwenvl_jax.load`."""
    from qwenvl_jax import loading
    from qwenvl_jax.checkpoint import load_params, read_config
    from qwenvl_jax.config import generation_eos_token_ids
    from qwenvl_jax.weights import checkpoint_files, hf_to_params, iter_hf_tensors

    path = Path(path).expanduser().absolute()
    policy = dict(policy, dtype=dtype, param_dtype=param_dtype or dtype)
    if loading._is_orbax(path):
        flat, config = load_params(path)
        config = config.replace(**policy)
        score = flat.pop(SCORE_PATH, None)
    elif (path / "config.json").exists() and checkpoint_files(path):
        config = read_config(path, **policy)
        found: dict[str, Any] = {}

        def backbone():
            for key, x in iter_hf_tensors(path):
                if normalize_hf_key(key) == SCORE:
                    found["score"] = x
                else:
                    yield key, x

        flat = hf_to_params(backbone(), config)
        score = found["score"].T if "score" in found else None
    else:
        raise FileNotFoundError(f"{path}: neither an HF checkpoint nor an Orbax checkpoint")
    if score is None:
        raise CheckpointMismatchError(missing=[SCORE_PATH], source=f"{path} (a reward model needs its head)")
    config = config.with_eos_token_ids(generation_eos_token_ids(loading._config_dir(path)))
    return loading.model_from_params(config, flat), {"kernel": jnp.asarray(score, jnp.float32)}
