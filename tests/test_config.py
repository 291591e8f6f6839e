"""Config parsing agrees with transformers' Qwen2_5_VLConfig on flat, nested and trimmed config.json forms."""

from __future__ import annotations

import json
import warnings

import pytest
from transformers import Qwen2_5_VLConfig

from qwenvl_jax.config import PRESETS, Qwen25VLConfig, generation_eos_token_ids

# The Hub's flat 7B config.json (text keys at the top level), as published.
HUB_7B_FLAT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

# A re-saved 3B copy trimmed by `to_diff_dict`: the vision config keeps only a few keys, so the class
# defaults (some of which are not the published values) fill the rest.
TRIMMED_3B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "hidden_size": 1280,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "spatial_patch_size": 14,
        "tokens_per_second": 2,
    },
}

# A pre-v5 nested save: the tie flag sits inside text_config and the outer one is absent; stray flat
# text keys beside text_config are ignored by transformers.
V4_NESTED_3B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 999,
    "text_config": {k: v for k, v in TRIMMED_3B.items() if k not in ("vision_config", "model_type")},
    "vision_config": dict(TRIMMED_3B["vision_config"]),
}


def _hf(hf: dict) -> Qwen2_5_VLConfig:
    # transformers warns that the Hub's own `rope_scaling` key is deprecated; that is its concern, not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return Qwen2_5_VLConfig(**json.loads(json.dumps(hf)))


def _check_against_transformers(ours: Qwen25VLConfig, ref: Qwen2_5_VLConfig):
    t, v = ref.text_config, ref.vision_config
    assert ours.text.hidden_size == t.hidden_size
    assert ours.text.num_hidden_layers == t.num_hidden_layers
    assert ours.text.num_attention_heads == t.num_attention_heads
    assert ours.text.num_key_value_heads == t.num_key_value_heads
    assert ours.text.intermediate_size == t.intermediate_size
    assert ours.text.vocab_size == t.vocab_size
    assert ours.text.rms_norm_eps == t.rms_norm_eps
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert list(ours.text.mrope_section) == list(t.rope_parameters["mrope_section"])
    assert ours.text.tie_word_embeddings == ref.tie_word_embeddings
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "temporal_patch_size",
                 "spatial_merge_size", "window_size", "out_hidden_size", "tokens_per_second"):  # fmt: skip
        assert getattr(ours.vision, name) == getattr(v, name), name
    assert list(ours.vision.fullatt_block_indexes) == list(v.fullatt_block_indexes)
    assert ours.image_token_id == ref.image_token_id and ours.video_token_id == ref.video_token_id


@pytest.mark.parametrize(
    "hf", [HUB_7B_FLAT, TRIMMED_3B, V4_NESTED_3B], ids=["hub_7b_flat", "trimmed_3b", "v4_nested_3b"]
)
def test_parsing_matches_transformers(hf):
    ours = Qwen25VLConfig.from_hf_dict(hf)
    ref = _hf(hf)
    _check_against_transformers(ours, ref)
    # The nested form transformers saves parses to the same architecture.
    again = Qwen25VLConfig.from_hf_dict(ref.to_dict())
    assert again.text == ours.text and again.vision == ours.vision


def test_hub_7b_equals_preset():
    ours = Qwen25VLConfig.from_hf_dict(HUB_7B_FLAT)
    assert ours.text == PRESETS["7B"].text and ours.vision == PRESETS["7B"].vision


def test_trimmed_config_takes_class_defaults_like_transformers():
    ours = Qwen25VLConfig.from_hf_dict(TRIMMED_3B)
    assert ours.text.tie_word_embeddings is True
    assert Qwen25VLConfig.from_hf_dict(V4_NESTED_3B).text == ours.text  # tie flag forwarded from text_config
    assert ours.vision.intermediate_size == 3420 and ours.vision.depth == 32
    # A config that omits the eps gets transformers' class default, not the published 1e-6.
    no_eps = {k: v for k, v in TRIMMED_3B.items() if k != "rms_norm_eps"}
    assert Qwen25VLConfig.from_hf_dict(no_eps).text.rms_norm_eps == _hf(no_eps).text_config.rms_norm_eps


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_transformers(name, tmp_path):
    preset = PRESETS[name]
    ref = _hf(preset.to_hf_dict())
    _check_against_transformers(preset, ref)
    preset.save_pretrained(tmp_path)
    loaded = Qwen25VLConfig.from_pretrained(tmp_path)
    assert loaded.text == preset.text and loaded.vision == preset.vision
    assert loaded.image_token_id == preset.image_token_id
    assert loaded.eos_token_id == preset.eos_token_id == (ref.text_config.eos_token_id,)


def test_rope_parameters_form_and_policy_overrides():
    hf = dict(HUB_7B_FLAT)
    hf.pop("rope_scaling")
    hf["rope_parameters"] = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 5e5}
    hf.pop("rope_theta")
    cfg = Qwen25VLConfig.from_hf_dict(hf, dtype="float32", remat="full")
    assert cfg.text.rope_theta == 5e5 and cfg.dtype == "float32" and cfg.remat == "full"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, "mrope_section"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
        ({"hidden_size": 3585}, "divisible"),
    ],
)
def test_inconsistent_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        Qwen25VLConfig.from_hf_dict({**HUB_7B_FLAT, **change})


def test_policy_values_are_checked():
    with pytest.raises(ValueError, match="attention_backend"):
        PRESETS["tiny"].replace(attention_backend="flash")
    with pytest.raises(ValueError, match="unknown preset"):
        Qwen25VLConfig.preset("13B")


def test_eos_token_id_list_round_trips(tmp_path):
    """Every stop id is kept (Qwen lists `<|im_end|>` and `<|endoftext|>`); transformers agrees both ways."""
    hf = {**HUB_7B_FLAT, "eos_token_id": [151645, 151643]}
    ours = Qwen25VLConfig.from_hf_dict(hf)
    assert ours.eos_token_id == (151645, 151643)
    ref = _hf(hf)
    assert list(ref.text_config.eos_token_id) == [151645, 151643]
    assert Qwen25VLConfig.from_hf_dict(ref.to_dict()).eos_token_id == (151645, 151643)  # nested form
    assert _hf(ours.to_hf_dict()).text_config.eos_token_id == [151645, 151643]
    ours.save_pretrained(tmp_path)
    assert Qwen25VLConfig.from_pretrained(tmp_path).eos_token_id == (151645, 151643)
    # A single id is written back as an int, where the checkpoint had an int.
    single = Qwen25VLConfig.from_hf_dict(HUB_7B_FLAT)
    assert single.eos_token_id == (151645,)
    out = single.to_hf_dict()
    assert type(out["eos_token_id"]) is int and type(out["text_config"]["eos_token_id"]) is int
    assert out["eos_token_id"] == out["text_config"]["eos_token_id"] == 151645
    assert _hf(out).text_config.eos_token_id == 151645


def test_eos_token_ids_accept_int_and_merge_in_order(tmp_path):
    tiny = PRESETS["tiny"]
    assert tiny.replace(eos_token_id=5).eos_token_id == (5,)
    assert tiny.replace(eos_token_id=[7, 8]).eos_token_id == (7, 8)
    for bad in ("7", 7.0, True, [7, None]):
        with pytest.raises(ValueError, match="eos_token_id"):
            tiny.replace(eos_token_id=bad)
    cfg = Qwen25VLConfig.from_hf_dict(HUB_7B_FLAT)
    assert cfg.with_eos_token_ids([151643, 151645, 151643]).eos_token_id == (151645, 151643)
    assert cfg.with_eos_token_ids(None) is cfg and cfg.with_eos_token_ids(151645) is cfg
    # generation_config.json's eos_token_id: an int, a list, null or absent.
    assert generation_eos_token_ids(tmp_path) == ()
    for value, want in ((151645, (151645,)), ([151645, 151643], (151645, 151643)), (None, ())):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        assert generation_eos_token_ids(tmp_path) == want
    for text in ("{not json", '{"eos_token_id": "x"}', "[]"):
        (tmp_path / "generation_config.json").write_text(text)
        with pytest.raises(ValueError, match=r"generation_config\.json"):
            generation_eos_token_ids(tmp_path)
