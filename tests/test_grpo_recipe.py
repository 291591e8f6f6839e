"""The geometry3k recipe (configs/recipes/geometry3k_*.yaml) runs on data in the Hub's Parquet layout.

A tiny stand-in for hiyouga/geometry3k (`images`: a list of {bytes, path} structs, `problem` with an
`<image>` placeholder, `answer`) goes through the recipe's own data, prompt and reward settings with the
tiny model in place of Qwen2.5-VL: the columns are renamed, EasyR1's format instructions are appended to
each prompt, geometry3k_reward scores the completions, and the run finishes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qwenvl_jax.train.config import load_config, resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("geometry3k_*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_a_valid_config(path):
    cfg = resolve(load_config(path))
    assert cfg["kind"] == "grpo" and cfg["rewards"] == ["geometry3k_reward"]
    assert cfg["grpo"]["num_generations"] == 5 and cfg["grpo"]["beta"] == 1e-2
    assert cfg["optim"]["learning_rate"] == 1e-6 and cfg["data"]["max_pixels"] == 4194304
    assert "\\boxed{}" in cfg["data"]["prompt_suffix"]


def test_recipe_runs_on_hub_layout_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from qwenvl_jax.data.synthetic import draw_shape
    from qwenvl_jax.train.loop import train

    def png(shape):
        buf = io.BytesIO()
        draw_shape(shape, "red", size=56, center=(28, 28), radius=12).save(buf, format="PNG")
        return buf.getvalue()

    rows = [
        {"images": [{"bytes": png(s), "path": None}], "problem": f"<image>How many sides has the {s}?",
         "answer": a}
        for s, a in (("square", "4"), ("triangle", "3"), ("square", "4"), ("triangle", "3"))
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
    over = [
        f"run_dir={tmp_path / 'run'}", "target=null", "mesh=null", "model.path=null", "model.preset=tiny",
        "model.dtype=float32", "model.remat=none", "model.attention_backend=xla", "steps=2", "seed=0",
        f"data.paths=[{tmp_path / 'train-00000-of-00001.parquet'}]", "data.worker_count=0",
        "data.min_pixels=3136", "data.max_pixels=3136", "batch.batch_size=5", "batch.seq_buckets=[256]",
        "batch.image_patches=80", "batch.max_images=5", "grad_accum=1", "grpo.max_prompt_length=240",
        "grpo.max_completion_length=16", "optim.learning_rate=1e-3", "logging.progress=false",
        "logging.tensorboard=false", "logging.plot=false", "grpo.log_completions_every=1",
    ]  # fmt: skip
    assert train(load_config(ROOT / "configs" / "recipes" / "geometry3k_3b.yaml", over)) == 0
    samples = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert samples and all(set(s["rewards"]) == {"geometry3k_reward"} for s in samples)
    # The prompt the model saw carries EasyR1's format instructions after the problem.
    assert all("How many sides" in s["prompt"] and "MUST BE put in \\boxed{}" in s["prompt"] for s in samples)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "rewards/geometry3k_reward/mean" in metrics[0]


def test_prompt_suffix_goes_after_the_last_user_text():
    from qwenvl_jax.data.prompts import with_suffix

    image_last = [{"role": "user", "content": [{"type": "text", "text": "Find x."}, {"type": "image"}]}]
    assert with_suffix(image_last, " Think.")[0]["content"][-1] == {"type": "text", "text": "Think."}
    text_last = [{"role": "system", "content": "s"},
                 {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}]  # fmt: skip
    out = with_suffix(text_last, " Think.")
    assert out[1]["content"][-1]["text"] == "Find x. Think." and out[0]["content"] == "s"
    assert text_last[1]["content"][-1]["text"] == "Find x."  # the record itself is not changed
