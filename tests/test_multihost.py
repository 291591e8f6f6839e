"""Multi-host training on this machine: local processes joined by `jax.distributed` on localhost (the
pattern of jax's own distributed tests), each with 4 fake CPU devices, against one process with 8.

Each process reads its own contiguous shard of the records (grain's sharding), so global batch k holds
rows k of process 0's shard, then of process 1's. The one-process reference reads a file with the records
in that order, which makes the global batches of both runs the same rows. GRPO and PPO generate: a global
micro-batch is each process's block of rows in turn, and each row samples with the key of its place in
that order, so the reference file interleaves the prompts block by block as well.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from multidevice import xla_flags

ROOT = Path(__file__).resolve().parent.parent
RECORDS = 32
ROWS = 4  # per process and micro-batch (pairs for DPO)
# The multi-device tests' bounds (`train_multidevice_checks.check_loop_mesh`): losses 1e-5 relative,
# parameters after the loop's Adam steps 1e-4. Two processes sum their collectives in another order than
# one (gloo between hosts), and Adam turns that float noise on gradients near zero into steps of up to
# the learning rate; measured worst parameter differences: SFT 4.7e-6, DPO 5.0e-6, GRPO 2.0e-5, PPO 1.1e-5.
PARAM_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    env.pop("QWENVL_PROCESS_ID", None)
    return env


def _command(config: Path, *sets: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qwenvl_jax.cli",
        "train",
        "--config",
        str(config),
        *(f"--set={s}" for s in sets),
    ]


def run_processes(config: Path, run_dir: Path, processes: int, *, timeout: float = 600, extra=()):
    """Start `processes` local processes of one run (1: a plain single-process run with 8 devices);
    returns their CompletedProcess-like `(returncode, output)` list, in process order."""
    if processes == 1:
        p = subprocess.run(_command(config, f"run_dir={run_dir}", *extra), env=_env(8), cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        return [(p.returncode, p.stdout + p.stderr)]
    procs = start_processes(config, run_dir, processes, extra=extra)
    return [finish(p, timeout) for p in procs]


def start_processes(config: Path, run_dir: Path, processes: int, *, extra=(), heartbeat: int = 100):
    port = _free_port()
    sets = (f"run_dir={run_dir}", f"distributed.coordinator_address=localhost:{port}",
            f"distributed.num_processes={processes}", f"distributed.heartbeat_s={heartbeat}", *extra)  # fmt: skip
    return [
        subprocess.Popen(
            _command(config, *sets, f"distributed.process_id={i}"),
            env=_env(8 // processes),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        return -999, out
    return p.returncode, out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _rows(run_dir)]


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    from qwenvl_jax.checkpoint import load_params

    return {k: np.asarray(v) for k, v in load_params(run_dir / "final")[0].items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """SFT records, DPO pairs and prompts, each as the multi-process runs read them and in the order that
    gives a one-process run the same global batches (GRPO: one prompt's G = 4 completions per process and
    micro-batch; PPO: 4 prompts per process and micro-batch)."""
    from qwenvl_jax.data import synthetic

    root = tmp_path_factory.mktemp("multihost")
    sft = synthetic.write_synthetic_data(root / "sft", RECORDS, seed=0)
    task = synthetic.write_shape_task(root / "dpo", num_train=RECORDS, num_heldout=1, seed=0)
    out = {"root": root}
    for name, path, block in (("sft", sft, ROWS), ("dpo", task.dpo, ROWS), ("grpo", task.grpo, 1),
                              ("ppo", task.grpo, ROWS)):  # fmt: skip
        lines = [x for x in Path(path).read_text().splitlines() if x.strip()]
        half = len(lines) // 2
        ordered = []
        for k in range(0, half, block):
            ordered += lines[k : k + block] + lines[half + k : half + k + block]
        reordered = Path(path).parent / f"global_order_{name}.jsonl"  # beside it: image paths are relative
        reordered.write_text("\n".join(ordered) + "\n")
        out[name], out[f"{name}_one"] = Path(path), reordered
    return out


def _reward_file(root: Path) -> Path:
    """A reward that varies with the sampled tokens (a random tiny policy never names the shape): groups
    get non-zero advantages, so GRPO and PPO really update."""
    path = root / "token_reward.py"
    path.write_text(
        "def token_reward(completions, completion_ids, **kwargs):\n"
        "    return [float(sum(ids) % 7) / 7 for ids in completion_ids]\n"
    )
    return path


def _config(root: Path, kind: str, data_path: Path, **over) -> Path:
    config = {
        "kind": kind,
        "run_dir": "unused",
        "steps": 3,
        "seed": 0,
        "model": {"preset": "tiny", "random_seed": 0, "dtype": "float32"},
        "data": {"paths": [str(data_path)], "shuffle": False, "num_epochs": None},
        "batch": {"batch_size": 2 * ROWS, "seq_buckets": [96, 128], "image_patches": 256, "max_images": 16},
        "grad_accum": 2,
        "mesh": {"data": 2, "fsdp": 4, "tensor": 1},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0},
        "checkpoint": {"every": 2, "keep": 2, "async": False},
        "logging": {"progress": False, "tensorboard": False, "plot": False},
    }
    if kind == "dpo":  # with LoRA: the reference is the base, and final/ merges the adapters across hosts
        config["dpo"] = {"loss_type": "sigmoid", "beta": 0.1}
        config["grad_accum"] = 1
        config["trainable"] = "lora"
        config["lora"] = {"rank": 4, "alpha": 8.0}
    if kind in ("grpo", "ppo"):  # 8 training rows of prompt (<= 80) + completion (16) per micro-batch
        config["batch"] = {"batch_size": 2 * ROWS, "seq_buckets": [96], "image_patches": 128, "max_images": 8}
        config["grad_accum"] = 1
        config["rewards"] = [f"{_reward_file(root)}:token_reward"]
        sampling = {"max_prompt_length": 80, "max_completion_length": 16, "temperature": 1.0,
                    "log_completions_every": 1}  # fmt: skip
    if kind == "grpo":  # 4 prompts x 4 completions per generation, served over 2 steps: old log-probs
        config["grpo"] = {**sampling, "num_generations": 4, "steps_per_generation": 2, "loss_type": "dapo",
                          "scale_rewards": "batch"}  # fmt: skip
    if kind == "ppo":  # 8 prompts per generation, one mini-batch, one epoch: one step per generation
        config["ppo"] = {**sampling, "num_ppo_epochs": 1, "num_mini_batches": 1, "kl_coef": 0.05,
                         "whiten_rewards": True}  # fmt: skip
    for key, value in over.items():
        config[key] = value
    path = root / f"{kind}_{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_ok(results):
    for i, (code, out) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{out[-3000:]}"


SFT_STEPS = 6
SFT_CHECKPOINTS = {"every": 2, "keep": 3, "async": False}


@pytest.fixture(scope="module")
def sft_runs(data, tmp_path_factory):
    """`(one, two, results)`: SFT on 1 process x 8 devices and on 2 x 4, uninterrupted."""
    root = tmp_path_factory.mktemp("sft_runs")
    over = {"steps": SFT_STEPS, "checkpoint": SFT_CHECKPOINTS}
    _assert_ok(run_processes(_config(data["root"], "sft", data["sft_one"], **over), root / "one", 1))
    results = run_processes(_config(data["root"], "sft", data["sft"], **over), root / "two", 2)
    _assert_ok(results)
    return root / "one", root / "two", results


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "ppo"])
def test_two_processes_equal_one(data, tmp_path, kind, request):
    """2 processes x 4 devices train as 1 process x 8 on the same global batches: the same losses and
    parameters (float32, highest precision), process 0 alone writing the run's files. GRPO and PPO: each
    process generates for its own prompts, and the completions, rewards, advantages (groups and batch
    statistics over both processes' rows) and logged metrics are those of one process."""
    if kind == "sft":  # the killed-process test resumes against the same 2-process run
        one, two, results = request.getfixturevalue("sft_runs")
    else:
        one, two = tmp_path / "one", tmp_path / "two"
        _assert_ok(run_processes(_config(data["root"], kind, data[f"{kind}_one"]), one, 1))
        results = run_processes(_config(data["root"], kind, data[kind]), two, 2)
        _assert_ok(results)
    want, got = _losses(one), _losses(two)
    assert len(got) == len(want) == (SFT_STEPS if kind == "sft" else 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    a, b = _final(one), _final(two)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= PARAM_ATOL, worst
    print(f"{kind}: worst parameter difference {worst:.2e}")
    assert "final model" in results[0][1] and "final model" not in results[1][1]
    assert (two / "skipped.jsonl").exists() or not (two / "skipped.p1.jsonl").exists()
    if kind in ("grpo", "ppo"):  # the generation metrics are the whole batch's
        for a, b in zip(_rows(one), _rows(two), strict=True):
            for key in [k for k in a if k.startswith(("rewards/", "completions/", "objective/"))]:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_killed_process_stops_the_other_and_both_resume(data, tmp_path, sft_runs):
    """SIGKILL one process of two: the survivor exits with one line within a bounded time, no hang; the
    same command on both then resumes from the last checkpoint and ends as an uninterrupted run does."""
    run_dir = tmp_path / "run"
    config = _config(data["root"], "sft", data["sft"], steps=SFT_STEPS, checkpoint=SFT_CHECKPOINTS)
    procs = start_processes(config, run_dir, 2, heartbeat=10)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.exists() and len(_losses(run_dir)) >= 3):
        time.sleep(0.5)
    assert metrics.exists() and len(_losses(run_dir)) >= 3, finish(procs[0], 1)[1][-3000:]
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    finish(procs[1], 60)
    code, out = finish(procs[0], 180)
    (tmp_path / "survivor.log").write_text(out)
    assert code not in (0, -999), out[-3000:]
    assert time.time() - start < 180
    assert "Traceback" not in out, out[-3000:]
    assert "error:" in out, out[-3000:]
    _assert_ok(run_processes(config, run_dir, 2))
    np.testing.assert_allclose(_losses(run_dir), _losses(sft_runs[1]), rtol=1e-6)  # uninterrupted


# One process of two stops on an error of its own (a bad record in its shard, a strict reward failure);
# the other is asleep here, as it would wait in its next collective.
_OWN_ERROR = """
import sys, time
from qwenvl_jax import distributed as dist
s = dist.Settings(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]), heartbeat_s=60)
dist.initialize(s)
dist.start_watchdog(s)
if s.process_id == 1:
    time.sleep(3)
    dist.finished(error="InputError: data.jsonl record 7: image missing.png not found\\nsecond line")
    sys.exit(2)
time.sleep(120)
print("process 0 was not stopped")
"""


def test_an_error_of_one_process_stops_the_others_with_its_line():
    """`distributed.finished(error=...)` on one process ends the others at once with that error's first
    line and exit status 1, well before jax's heartbeat limit (60 s here) would."""
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OWN_ERROR, address, str(i)],
            env=_env(1),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    start = time.time()
    code, out = finish(procs[0], 100)
    elapsed = time.time() - start
    finish(procs[1], 60)
    assert code == 1, out[-3000:]
    assert elapsed < 30, (elapsed, out[-3000:])
    assert "process 0 was not stopped" not in out and "Traceback" not in out, out[-3000:]
    line = "error: process 1 of 2 stopped: InputError: data.jsonl record 7: image missing.png not found; this"
    assert line in out, out[-3000:]


def test_sigterm_on_one_host_stops_all_at_the_same_step(data, tmp_path):
    """SIGTERM to process 1 only: both processes stop at the same step, save one checkpoint of it and exit
    3 (stopped, resumable), as a one-process run does."""
    run_dir = tmp_path / "run"
    config = _config(
        data["root"], "sft", data["sft"], steps=50, checkpoint={"every": 100, "keep": 2, "async": False}
    )
    procs = start_processes(config, run_dir, 2)
    deadline = time.time() + 400
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= 2
    ):
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p, 300) for p in procs]
    assert [code for code, _ in results] == [3, 3], results[0][1][-2000:] + results[1][1][-2000:]
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] == len(_losses(run_dir)) < 50
    assert "SIGTERM: saved step" in results[0][1]


def test_uneven_shards_end_the_data_together(data, tmp_path):
    """One epoch where process 1's shard holds bad records (skipped): it runs out of batches first, and
    both processes end the run at the same step instead of one waiting forever."""
    lines = data["sft"].read_text().splitlines()
    lines[RECORDS - 5 :] = ["{not json"] * 5
    uneven = data["sft"].parent / "uneven.jsonl"
    uneven.write_text("\n".join(lines) + "\n")
    config = _config(data["root"], "sft", uneven, steps=50,
                     data={"paths": [str(uneven)], "shuffle": False, "num_epochs": 1})  # fmt: skip
    results = run_processes(config, tmp_path / "run", 2)
    _assert_ok(results)
    assert all("data exhausted" in out for _, out in results[:1]), results[0][1][-2000:]
    # 16 records per shard, 8 per step: process 1's 11 good ones make one step and a short micro-batch.
    assert len(_losses(tmp_path / "run")) == 1


# ------------------------------------------------------------------------------- one process, no jax
def test_settings_from_config_and_environment():
    from qwenvl_jax.distributed import DistributedError, settings

    assert not settings(None, {}).enabled
    env = {
        "QWENVL_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "QWENVL_NUM_PROCESSES": "4",
        "QWENVL_PROCESS_ID": "3",
    }
    s = settings({"heartbeat_s": 30}, env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.heartbeat_s) == (
        "10.0.0.1:1234",
        4,
        3,
        30,
    )
    assert settings({"process_id": 1}, env).process_id == 1  # the config wins over the environment
    assert settings({"auto": True}, {}).enabled
    with pytest.raises(
        DistributedError, match=r"distributed\.process_id is not set \(nor QWENVL_PROCESS_ID\)"
    ):
        settings({"coordinator_address": "h:1", "num_processes": 2}, {})
    with pytest.raises(DistributedError, match=r"distributed\.process_id=2 is outside 0\.\.1"):
        settings({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {})
    with pytest.raises(DistributedError, match=r"QWENVL_NUM_PROCESSES='two': expected an integer"):
        settings(None, {"QWENVL_NUM_PROCESSES": "two"})


def test_a_global_batch_that_does_not_split_is_refused_by_key():
    from qwenvl_jax.train.config import ConfigError
    from qwenvl_jax.train.hosts import check_split

    base = {"kind": "sft", "batch": {"batch_size": 8, "image_patches": 256, "max_images": 16}}
    check_split(base, 2)
    with pytest.raises(ConfigError, match=r"batch\.batch_size=6 does not split over 4 processes"):
        check_split({**base, "batch": {**base["batch"], "batch_size": 6}}, 4)
    with pytest.raises(ConfigError, match=r"batch\.image_patches=260 .* multiple of 16"):
        check_split({"kind": "dpo", "batch": {"batch_size": 8, "image_patches": 260}}, 2)
    grpo = {"kind": "grpo", "batch": {"batch_size": 8, "image_patches": 128, "max_images": 8}, "grad_accum": 1,
            "grpo": {"num_generations": 4, "steps_per_generation": 2}, "mesh": {"data": 2, "fsdp": 4, "tensor": 1}}  # fmt: skip
    check_split(grpo, 2)  # 4 prompts per generation, 2 per process
    with pytest.raises(ConfigError, match=r"grpo: 2 prompts per generation .* do not split over 4 processes"):
        check_split({**grpo, "grpo": {"num_generations": 8, "steps_per_generation": 2}}, 4)
    with pytest.raises(ConfigError, match=r"mesh data x fsdp = 2 does not split over 4 processes"):
        check_split({**grpo, "mesh": {"data": 1, "fsdp": 2, "tensor": 4}}, 4)


def test_pair_blocks_order_the_rows_as_one_block():
    from qwenvl_jax.losses import pair_order

    # Two processes' [c0 c1 r0 r1] [c2 c3 r2 r3] -> [c0 c1 c2 c3 r0 r1 r2 r3].
    assert pair_order(8, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert pair_order(8, 1).tolist() == list(range(8))


def test_merged_vision_inputs_give_the_one_batch_numbers(data):
    """The core of the global batch: two processes' halves of a batch, each collated at half the budget
    and merged (`distributed.merge_vision`, rows concatenated), give the model the hidden states of the
    whole batch collated at once."""
    import jax.numpy as jnp

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.data import SFTRecord, read_jsonl
    from qwenvl_jax.data.pipeline import encode_sft
    from qwenvl_jax.distributed import merge_vision, vision_keys
    from qwenvl_jax.loading import random_model
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS
    from qwenvl_jax.processing import BatchSpec, Processor, collate
    from qwenvl_jax.tiny import write_tiny_checkpoint

    proc = Processor.from_pretrained(write_tiny_checkpoint(data["root"] / "ckpt"))
    records = [r for r in read_jsonl(data["sft"]) if isinstance(r, SFTRecord)][:4]
    examples = [encode_sft(proc, r) for r in records]
    ids = dict(pad_token_id=proc.pad_token_id, image_token_id=proc.image_token_id,
               video_token_id=proc.video_token_id)  # fmt: skip
    whole = collate(
        examples, BatchSpec(batch_size=4, seq_buckets=(96,), image_patches=128, max_images=8, **ids)
    )
    half = BatchSpec(batch_size=2, seq_buckets=(96,), image_patches=64, max_images=4, **ids)
    parts = [collate(examples[:2], half), collate(examples[2:], half)]
    merged = merge_vision([{k: p[k] for k in vision_keys(p)} for p in parts], rows=2)
    for key in parts[0]:
        if key not in merged:
            axis = 1 if key == "position_ids" else 0
            merged[key] = np.concatenate([p[key] for p in parts], axis=axis)
    assert merged["pixel_values"].shape == whole["pixel_values"].shape
    model = random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)

    def hidden(batch):
        return np.asarray(
            model.hidden_states(**{k: jnp.asarray(v) for k, v in batch.items() if k in CORE_KEYS})
        )

    want = hidden(whole)
    np.testing.assert_allclose(hidden(merged), want, atol=2e-5 * np.abs(want).max())
