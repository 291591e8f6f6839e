"""On 8 fake CPU devices: one SFT step (meshes 8x1x1, 1x8x1, 1x4x2, 2x2x2), one DPO step (2x2x2) and whole
`train()` runs with a mesh (SFT 2x2x2, DPO + LoRA 1x4x2) equal one device; the activation hints apply;
GRPO's sampler view is in the decode layout and decodes as one device does (LoRA too); a PPO run with QLoRA
on a mesh (NF4 base, rollouts, scoring pass, step, dequantized merge) equals one device.

Runs `tests/train_multidevice_checks.py` in two subprocesses (the device-count flag only works before jax
initialises); each check is one test here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from multidevice import assert_passed, run_check_groups

SCRIPT = Path(__file__).with_name("train_multidevice_checks.py")
GROUPS = (
    ("sft_step_8x1x1", "sft_step_1x4x2", "dpo_step_2x2x2"),
    ("sft_step_1x8x1", "sft_step_2x2x2", "activation_hints_1x8x1", "loop_ppo_qlora_1x4x2"),
    ("loop_sft_2x2x2", "loop_dpo_lora_1x4x2", "grpo_sampler_view_1x2x4"),
)
ALL_CHECKS = [name for group in GROUPS for name in group]


@pytest.fixture(scope="module")
def report():
    return run_check_groups(SCRIPT, GROUPS)


def test_groups_cover_every_check():
    sys.path.insert(0, str(SCRIPT.parent))
    import train_multidevice_checks

    assert set(ALL_CHECKS) == set(train_multidevice_checks.CHECKS)


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_train_multidevice(report, name):
    assert_passed(report, name)
