"""Training: optimizer, trainable subsets and LoRA, the train state, and the jitted SFT/DPO steps."""

from qwenvl_jax.train.lora import LoraConfig, apply_lora, init_lora, merge_lora
from qwenvl_jax.train.optim import OptimConfig, decay_mask, learning_rate_schedule, make_optimizer
from qwenvl_jax.train.state import TrainState, init_train_state, param_logical_axes, split_model
from qwenvl_jax.train.step import (
    accumulate,
    build_model,
    dpo_step,
    make_train_step,
    sft_step,
    stack_micro_batches,
)

__all__ = [
    "LoraConfig",
    "OptimConfig",
    "TrainState",
    "accumulate",
    "apply_lora",
    "build_model",
    "decay_mask",
    "dpo_step",
    "init_lora",
    "init_train_state",
    "learning_rate_schedule",
    "make_optimizer",
    "make_train_step",
    "merge_lora",
    "param_logical_axes",
    "sft_step",
    "split_model",
    "stack_micro_batches",
]
