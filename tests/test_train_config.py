"""The edges of a training run: config schema and YAML numbers, paths, inputs and mesh checked before
anything is written, the run_dir lock, resumes with a changed config, exit codes and the CLI's help.

Each test here fails on a loop that validates a config by hand, reads `1e-5` as a string, writes into
run_dir before checking, lets two processes share a run_dir, resumes silently with another config, or
exits 0 after SIGTERM or a mostly-skipped run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl_jax.cli import build_parser, main
from qwenvl_jax.train import config as cfglib
from qwenvl_jax.train import runs
from qwenvl_jax.train.config import ConfigError, apply_overrides, load_config, resolve

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"batch_size": 2, "seq_buckets": [96], "image_patches": 64, "max_images": 4}
QUIET = {"progress": False, "tensorboard": False, "plot": False}


def config(run_dir, **over) -> dict:
    return {
        "run_dir": str(run_dir), "steps": 3, "seed": 0,
        "model": {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"},
        "data": {"synthetic": 8}, "batch": BATCH,
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "checkpoint": {"every": 0, "async": False}, "logging": QUIET,
        **over,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- numbers
def test_yaml_numbers_in_either_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\ndata: {synthetic: 4}\noptim:\n  learning_rate: 1e-5\n  eps: 1.0e-8\n")
    cfg = load_config(path, ["optim.weight_decay=1E-2", "optim.b2=9.5e-1", "steps=3"])
    assert cfg["optim"] == {"learning_rate": 1e-5, "eps": 1e-8, "weight_decay": 1e-2, "b2": 0.95}
    assert cfg["steps"] == 3 and isinstance(cfg["steps"], int)
    resolved = resolve(cfg)
    assert resolved["optim"]["learning_rate"] == 1e-5 and isinstance(
        resolved["optim"]["learning_rate"], float
    )
    # A number quoted as a string (e.g. from JSON) is coerced to the declared float, not passed on as text.
    assert resolve(config(tmp_path, optim={"learning_rate": "2e-4"}))["optim"]["learning_rate"] == 2e-4


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "over, match",
    [
        (
            {"batch": {"batch_size": "two"}},
            r"config batch\.batch_size='two': input should be a valid integer",
        ),
        ({"batch": {"batch_size": True}}, r"config batch\.batch_size=True"),
        (
            {"data": {"synthetic": 8, "policy": "ignore"}},
            r"config data\.policy='ignore': .*'skip' or 'strict'",
        ),
        (
            {"model": {"preset": "tiny", "remat": True}},
            r"config model\.remat=True: .*'none', 'full' or 'dots'",
        ),
        ({"model": {"preset": "tiny", "dtype": "float8"}}, r"config model\.dtype='float8'"),
        ({"model": {"preset": "13B"}}, r"config model\.preset='13B': unknown preset"),
        ({"optim": {"learning_rate": -1.0}}, r"config optim\.learning_rate=-1\.0: input should be greater"),
        ({"optim": {"schedule": "step"}}, r"config optim\.schedule='step'"),
        ({"lora": {"rank": 0}, "trainable": "lora"}, r"config lora\.rank=0"),
        ({"batch": {"batch_size": 2, "seq_buckets": [96, 64]}}, r"config batch: .*seq_buckets.*increasing"),
        ({"target": "2xa100"}, r"config target='2xa100'"),
        ({"kind": "dpo", "dpo": {"loss_type": "dpo"}}, r"config dpo\.loss_type='dpo': unknown DPO loss type"),
        (
            {"kind": "dpo", "batch": {"batch_size": 2, "seq_buckets": [64], "image_patches": 36}},
            r"batch\.image_patches=36 must be a multiple of 8 for pairs: .* \(kind: dpo\)",
        ),
        ({"checkpoint": {"every": -1}}, r"config checkpoint\.every=-1"),
        ({"data": {"paths": ["a.jsonl"], "synthetic": 3}}, "give paths or synthetic, not both"),
        ({"data": {"shuffle": True}}, "data needs paths"),
        (
            {"model": {"preset": "tiny", "param_dtype": "bfloat16"}},
            r"param_dtype=bfloat16 with trainable: full",
        ),
        (
            {"trainable": "frozen_vision", "model": {"preset": "tiny", "param_dtype": "float16"}},
            "master weights",
        ),
    ],
)
def test_bad_values_name_key_value_and_choices(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(config(tmp_path, **over))


GRPO = {"kind": "grpo", "rewards": ["accuracy_reward"], "batch": {**BATCH, "batch_size": 4},
        "grpo": {"num_generations": 4}}  # fmt: skip


@pytest.mark.parametrize(
    "over, match",
    [
        ({"rewards": None}, "kind: grpo needs rewards"),
        (
            {"grpo": {"num_generations": 3}},
            r"4 completions per generation is not a multiple of grpo\.num_generations=3",
        ),
        (
            {"grpo": {"num_generations": 1}},
            r"config grpo\.num_generations=1: input should be greater than or equal to 2",
        ),
        ({"grpo": {"loss_type": "ppo"}}, r"config grpo\.loss_type='ppo'"),
        ({"grpo": {"scale_rewards": "std"}}, r"config grpo\.scale_rewards='std'"),
        ({"grpo": {"num_generations": 4, "reward_weights": [1.0, 2.0]}}, "2 weights for 1 rewards"),
        ({"kind": "sft"}, "a grpo section needs kind: grpo"),
        ({"batch": {**BATCH, "batch_size": 4, "pack": True}}, "packing applies to SFT only"),
    ],
)
def test_grpo_config_errors(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(config(tmp_path, **{**GRPO, **over}))


def test_grpo_config_accepted(tmp_path):
    cfg = resolve(config(tmp_path, **GRPO))
    assert cfg["kind"] == "grpo" and cfg["grpo"] == {"num_generations": 4}
    assert load_config(ROOT / "configs" / "grpo_tiny_cpu.yaml")["kind"] == "grpo"
    resolve(load_config(ROOT / "configs" / "grpo_tiny_cpu.yaml"))


def test_run_dir_is_required(tmp_path):
    with pytest.raises(ConfigError, match=r"config needs run_dir \(e\.g\. --set run_dir="):
        resolve({**config(tmp_path), "run_dir": ""})
    with pytest.raises(ConfigError, match="config needs run_dir"):
        resolve({k: v for k, v in config(tmp_path).items() if k != "run_dir"})


def test_bf16_base_is_fine_under_lora(tmp_path):
    cfg = resolve(config(tmp_path, trainable="lora", model={"preset": "tiny", "param_dtype": "bfloat16"}))
    assert cfg["model"]["param_dtype"] == "bfloat16"


def test_qlora_keys_are_checked(tmp_path):
    cfg = resolve(config(tmp_path, trainable="lora", lora={"quantize": "nf4", "quantize_vision": True}))
    assert cfg["lora"]["quantize"] == "nf4" and cfg["lora"]["quantize_vision"] is True
    with pytest.raises(ConfigError, match=r"config lora\.quantize='nf3'"):
        resolve(config(tmp_path, trainable="lora", lora={"quantize": "nf3"}))
    with pytest.raises(ConfigError, match=r"lora\.quantize_vision: true needs lora\.quantize: nf4"):
        resolve(config(tmp_path, trainable="lora", lora={"quantize_vision": True}))
    with pytest.raises(ConfigError, match="a lora section needs trainable: lora"):
        resolve(config(tmp_path, lora={"quantize": "nf4"}))


@pytest.mark.parametrize("raw", ["batch.seq_buckets=[96,", "=3", "a..b=1", "model.preset.x=1"])
def test_malformed_set_is_one_line(raw):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides({"model": {"preset": "tiny"}}, [raw])


def test_broken_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kind: sft\nbatch: {batch_size: 2\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML \(line \d+"):
        load_config(path)


def test_schema_sections_match_what_they_configure():
    """A field added to BatchSpec, LoraConfig, OptimConfig or dpo_objective must be added to the schema."""
    from qwenvl_jax.processing.batch import BatchSpec
    from qwenvl_jax.train.lora import LoraConfig
    from qwenvl_jax.train.optim import OptimConfig

    def names(model):
        return {f.alias or n for n, f in model.model_fields.items()}

    assert names(cfglib.BatchSection) == {f.name for f in dataclasses.fields(BatchSpec)} | {"pack"}
    assert names(cfglib.LoraSection) == {f.name for f in dataclasses.fields(LoraConfig)}
    assert names(cfglib.OptimSection) == {f.name for f in dataclasses.fields(OptimConfig)}
    assert names(cfglib.DpoSection) == set(cfglib.dpo_keys())
    assert names(cfglib.GrpoSection) == set(cfglib.grpo_loss_keys()) | set(cfglib.GRPO_HOST_KEYS)
    assert names(cfglib.RunConfig) == set(cfglib.DEFAULTS)


# ----------------------------------------------------------------------------------------- the edges
def test_paths_resolved_once_at_the_edge(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = runs.resolve_paths(
        resolve(config("runs/a", model={"path": "ckpt/m"}, data={"paths": ["d/x.jsonl"]}, processor="proc"))
    )
    assert out["run_dir"] == str(tmp_path / "runs/a")
    assert out["model"]["path"] == str(tmp_path / "ckpt/m")
    assert out["data"]["paths"] == [str(tmp_path / "d/x.jsonl")]
    assert out["processor"] == str(tmp_path / "proc")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"model": {"path": "nowhere"}}, r"model\.path .*nowhere: no such checkpoint directory"),
        ({"data": {"paths": ["missing.jsonl"]}}, r"data\.paths: .*missing\.jsonl: no such file"),
        ({"processor": "noproc"}, r"processor .*noproc: no such directory"),
        (
            {"mesh": {"data": 2, "fsdp": 2}},
            r"mesh data=2 x fsdp=2 x tensor=1 needs 4 devices; this process sees 1",
        ),
    ],
)
def test_run_refused_before_run_dir_is_written(tmp_path, monkeypatch, capsys, over, match):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config("run", **over)))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets", [["batch.batch_size=two"], ["model.remat=yes"], ["data.policy=ignore"]])
def test_cli_value_errors_exit_2_without_traceback(tmp_path, capsys, sets):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config(tmp_path / "run")))
    argv = ["train", "--config", str(path)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config ") and "Traceback" not in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ lock
def test_one_process_per_run_dir(tmp_path):
    with subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from qwenvl_jax.train.runs import RunLock; "
         f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(ConfigError, match=rf"run_dir {tmp_path} is in use by pid {holder.pid} on "):
                runs.RunLock(tmp_path).acquire()
        finally:
            holder.kill()
            holder.wait()
    # The kernel released the dead owner's lock: the run_dir can be taken again (a resume after kill -9).
    with runs.RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


# ---------------------------------------------------------------------------------- resumed configs
def test_config_changes_split_refused_and_reported(tmp_path):
    old = resolve(config(tmp_path))
    new = resolve(config(tmp_path, steps=10, trainable="lora", batch={**BATCH, "batch_size": 4},
                         optim={"learning_rate": 1e-3, "schedule": "constant"}, logging={"progress": True}))  # fmt: skip
    refused, reported = runs.config_changes(old, new)
    assert refused == ["batch.batch_size: 2 -> 4", "trainable: 'full' -> 'lora'"]
    assert reported == ["optim.learning_rate: 0.003 -> 0.001", "steps: 3 -> 10"]


def test_resume_with_changed_structure_is_refused(tmp_path):
    (tmp_path / "checkpoints" / "2" / "config").mkdir(parents=True)
    saved = resolve(config(tmp_path))
    (tmp_path / "checkpoints" / "2" / "config" / "metadata").write_text(json.dumps(saved))
    with pytest.raises(
        ConfigError, match=r"checkpoint \(step 2\) saved with a different config.*seed: 0 -> 1"
    ):
        runs.check_resume(tmp_path / "checkpoints", resolve(config(tmp_path, seed=1)))
    assert runs.check_resume(tmp_path / "checkpoints", resolve(config(tmp_path, steps=9))) == [
        "steps: 3 -> 9"
    ]


# ------------------------------------------------------------------------------------------ exit codes
def test_mostly_skipped_run_exits_4_with_a_warning(tmp_path, capsys):
    from qwenvl_jax.train.loop import train

    # The first update is finite but huge; every later forward overflows and its update is skipped.
    cfg = config(
        tmp_path / "r", steps=4, max_bad_steps=10, optim={"learning_rate": 1e15, "schedule": "constant"}
    )
    assert train(cfg) == runs.EXIT_UNHEALTHY
    assert "3 of 4 steps were skipped as non-finite" in capsys.readouterr().err
    assert (tmp_path / "r" / "final").is_dir()


# ------------------------------------------------------------------------------------------------- CLI
def test_every_option_has_help_and_train_help_explains_resume_and_exit_codes(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "resume:" in text and "exit codes:" in text and "3  stopped by SIGTERM" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 256)" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("qwenvl-jax 0.")


def test_parity_without_torch_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert main(["parity", "--random", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'qwenvl-jax[test]'" in err and "torch" in err


def test_tiny_checkpoint_without_torch(tmp_path):
    out = tmp_path / "tiny"
    code = (
        "import sys; from qwenvl_jax.cli import main; rc = main(['tiny', '--out', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    import qwenvl_jax
    from qwenvl_jax.processing import Processor

    model = qwenvl_jax.load(out, dtype="float32")
    batch = Processor.from_pretrained(out)(text=["hello"])
    assert model(**batch).shape[:2] == (1, batch["input_ids"].shape[1])


def test_batch_specs_are_not_run_configs():
    assert not list((ROOT / "configs").glob("batch_*.yaml"))
    for path in (ROOT / "configs" / "batch_specs").glob("*.yaml"):
        with pytest.raises(ConfigError, match="unknown top-level keys"):
            resolve(load_config(path, ["run_dir=/tmp/x"]))


# ------------------------------------------------------------------------------------------ bad records
def test_bad_and_over_budget_records_are_skipped_once_and_listed(tmp_path):
    from qwenvl_jax.data.synthetic import draw_shape
    from qwenvl_jax.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    draw_shape("circle", "red", size=56, center=(28, 28), radius=12).save(data / "a.png")
    good = {"image": "a.png", "prefix": "What is in the image?", "suffix": "A red circle."}
    rows = [{"id": f"g{i}", **good} for i in range(4)]
    rows.insert(1, {"id": "missing", **good, "image": "nope.png"})
    # Five images: more than max_images=4 even alone, so no batch can ever hold it.
    rows.insert(3, {"id": "five", "images": ["a.png"] * 5, "messages": [
        {"role": "user", "content": [{"type": "image"}] * 5 + [{"type": "text", "text": "Count."}]},
        {"role": "assistant", "content": "Five."}]})  # fmt: skip
    (data / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = config(run, steps=4, data={"paths": [str(data / "d.jsonl")], "shuffle": False, "num_epochs": 2},
                 batch={**BATCH, "seq_buckets": [256]})  # fmt: skip
    assert train(cfg) == 0
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    # Two epochs pass over each bad record; each is listed (and counted) once.
    assert sorted((s["id"], s["reason"]) for s in skipped) == [
        ("five", "too_long"),
        ("missing", "missing_image"),
    ]
    assert all(s["location"].endswith(("d.jsonl:2", "d.jsonl:4")) for s in skipped)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["records_skipped"] == 2


@pytest.mark.parametrize("backend, platform", [("splash", "TPU"), ("cudnn", "GPU")])
def test_a_fused_backend_off_its_platform_is_refused_in_one_line(backend, platform):
    """`splash` compiles for TPU only and `cudnn` for GPU: on this CPU a run refuses them before any
    weights load, naming the key, instead of failing inside XLA at the first step."""
    import jax

    from qwenvl_jax.train.loop import check_backend_platform

    assert jax.default_backend() == "cpu"
    with pytest.raises(ConfigError, match=rf"model\.attention_backend={backend} runs on {platform} only"):
        check_backend_platform({"attention_backend": backend})
    check_backend_platform({"attention_backend": "xla"})
