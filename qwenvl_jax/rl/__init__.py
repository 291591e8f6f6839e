"""Reinforcement learning from verifiable rewards: reward functions (host side, no jax)."""

from qwenvl_jax.rl.rewards import (
    BUILTINS,
    Reward,
    RewardError,
    Scores,
    completion_text,
    load_reward,
    load_rewards,
    score,
)

__all__ = [
    "BUILTINS",
    "Reward",
    "RewardError",
    "Scores",
    "completion_text",
    "load_reward",
    "load_rewards",
    "score",
]
