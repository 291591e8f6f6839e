"""One GRPO step of Qwen2.5-VL: ours (rollout + jitted `grpo_step`) vs transformers + TRL 1.16 `GRPOTrainer`.

Both sides: the same random weights (bench/common.py), the same P prompts (one chat turn: a synthetic
square image, 448x448 by default, and the same text; encoded by each side's own processor from the same
tokenizer files, and the parent checks that the prompt ids and pixels agree), G sampled completions per
prompt of EXACTLY `--completion-tokens` tokens (EOS cannot be sampled: ours adds the stop ids to the
suppressed ids, TRL passes `min_new_tokens = max_new_tokens`, which masks the same ids), temperature 1, no
top-k / top-p, the same reward function, full fine-tuning with AdamW (lr 1e-6, constant, no weight decay,
clip 1.0), `--dtype` compute over `--param-dtype` master weights, loss `--loss-type` (dapo), `--beta`.
The P x G completions form ONE optimizer step of `P x G / --micro-batch` micro-batches on both sides.
- ours: the pieces `train.loop` runs through `train.grpo.GrpoSource.next_step`, one at a time: the
  sampler view of the train state (`train.grpo.sampler_view`, compute dtype), `rl.rollout` (one prefill per
  prompt, G completions from it), decode + `rl.rewards.score` + `losses.grpo_advantages` +
  `rl.batch.micro_batches`, then `make_train_step("grpo")`, jitted, `--backend` attention, `--remat`;
  with beta > 0 a frozen copy of the initial params is the reference, as in the loop.
- trl: `GRPOTrainer(model=<the HF model>, processing_class=<the HF processor>)` with plain
  `model.generate` (no vLLM), `per_device_train_batch_size = --micro-batch`, gradient accumulation
  `P x G / --micro-batch` (so `steps_per_generation` makes one generation batch per optimizer step),
  activation checkpointing when `--remat` is not none, `bf16=True` (autocast over the `--param-dtype`
  weights) when `--dtype` is bfloat16, fused AdamW on CUDA; with beta > 0 the reference is a copy of the
  initial policy (what TRL would load from the checkpoint path these weights lack); driven by
  `trainer.train()` for `--warmup + --steps` optimizer steps.

Timed per optimizer step (device synchronised at every boundary), with verl's phase names
(`timing_s/<phase>`):
- gen: ours `rollout` (prompt collation, prefill, decode loop); trl `_generate_single_turn` (left padding
  and `model.generate`, which runs the vision tower once per completion);
- reward: the rest of the data preparation. Ours: decoding, rewards, advantages, micro-batch collation and
  stacking. TRL: the rest of `_generate_and_score_completions` (chat template + image processing of the
  P x G prompts, twice: for generation and for the forward kwargs; decoding, rewards, advantages);
- old_log_prob, ref: no-grad scoring passes. TRL runs them in `_generate_and_score_completions` (old
  log-probs only off-policy, ref only with beta > 0; both 0 here by default). Ours computes the
  reference log-probs inside the jitted step (reported as null: part of update_actor);
- update_actor: ours the jitted step (host-to-device copy of the micro-batches, forward, loss, backward,
  clip, AdamW); trl the rest of the optimizer step (`compute_loss` + backward per micro-batch, clip,
  optimizer step);
- update_weights: ours assembling the generation model from the train state; trl 0 (it generates with
  the training module itself);
- step: the whole optimizer step (trl: from the callback's `on_step_begin` to `on_step_end`).
Each is the median over `--steps` steps after `--warmup` steps. Throughputs: rollout tokens/s = P x G x N
generated tokens / gen; train tokens/s = real tokens of the P x G rows (prompt + completion) / (old_log_prob
+ ref + update_actor). Ours' first step compiles the generation and train programs: its phases are reported
as `first_*` and `compile_s` = first step - median step (a persistent cache, `--jax-cache-dir`, makes a
rerun skip most of it). Ratios ours/TRL are emitted as one `kind: "ratio"` record.

    python bench/bench_grpo.py                                   # 3B, 8 prompts x 8, 256 tokens, both sides
    python bench/bench_grpo.py --prompts 4 --generations 8 --completion-tokens 128 --sides ours
    python bench/bench_grpo.py --preset tiny --device cpu        # seconds, for tests
"""

from __future__ import annotations

import copy
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULTS = {"tiny": {"prompts": 2, "generations": 2, "completion_tokens": 8, "micro_batch": 2, "steps": 1,
                     "warmup": 1}}  # fmt: skip
DEFAULT = {"prompts": 8, "generations": 8, "completion_tokens": 256, "micro_batch": 8, "steps": 3,
           "warmup": 1}  # fmt: skip
PHASES = ("gen", "reward", "old_log_prob", "ref", "update_actor", "update_weights", "step")
PROMPT_TEXT = "Describe this picture in detail."
SIDES = ("ours", "trl")


# ------------------------------------------------------------------------------------ shared inputs


def reward_fn(completion_ids, **_):
    """A cheap reward that varies inside each group (so advantages are not all zero): both sides use it."""
    return [float(sum(ids) % 7) / 3.0 for ids in completion_ids]


def _images(job):
    """P synthetic RGB images (uniform noise: the processing cost does not depend on content)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(job["seed"])
    px = job["image_px"]
    return [Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(job["prompts"])]


def _processor_dir(job, tmp: str) -> Path:
    """The tokenizer, chat template and preprocessor config both sides read: the real Qwen2.5 vocabulary
    for real presets, the tiny tokenizer for `tiny` (its ids are the tiny config's)."""
    from conversion import tiny_hf

    return tiny_hf.save_checkpoint_dir(Path(tmp) / "processor", real_tokenizer=job["preset"] != "tiny")


def _digest(prompt_ids, pixels) -> dict:
    """Order-free fingerprints of the prompts a side generated from: ids and float32 pixels per prompt."""
    import numpy as np

    ids = sorted({hashlib.sha256(np.asarray(p, np.int64).tobytes()).hexdigest() for p in prompt_ids})
    pix = sorted({hashlib.sha256(np.asarray(p, np.float32).tobytes()).hexdigest() for p in pixels})
    return {"prompt_ids_sha": hashlib.sha256("".join(ids).encode()).hexdigest()[:16],
            "pixels_sha": hashlib.sha256("".join(pix).encode()).hexdigest()[:16],
            "prompt_tokens": int(np.mean([len(p) for p in prompt_ids]))}  # fmt: skip


def _summary(per_step: list[dict], warmup: int) -> dict:
    timed = per_step[warmup:]
    out = {f"timing_s/{k}": (None if any(s[k] is None for s in timed) else common.median(s[k] for s in timed))
           for k in PHASES}  # fmt: skip
    out.update({f"first_{k}_s": per_step[0][k] for k in ("gen", "update_actor", "step")})
    return out


# ------------------------------------------------------------------------------------------------ ours


def ours(job) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwenvl_jax import losses
    from qwenvl_jax.processing import BatchSpec, Processor
    from qwenvl_jax.rl.batch import micro_batches
    from qwenvl_jax.rl.rewards import score
    from qwenvl_jax.rl.rollout import SamplingConfig, rollout, suppressed_ids
    from qwenvl_jax.train.grpo import grpo_step_kw, sampler_view
    from qwenvl_jax.train.lora import flatten, unflatten
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import init_train_state, split_model
    from qwenvl_jax.train.step import make_train_step, stack_micro_batches

    P, G, N, B = job["prompts"], job["generations"], job["completion_tokens"], job["micro_batch"]
    config = common.model_config(job["preset"], dtype=job["dtype"], param_dtype=job["param_dtype"],
                                 attention_backend=job["backend"], remat=job["remat"])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        processor = Processor.from_pretrained(_processor_dir(job, tmp))
    prompts = []
    for i, image in enumerate(_images(job)):
        content = [{"type": "image", "image": image}, {"type": "text", "text": PROMPT_TEXT}]
        messages = [{"role": "user", "content": content}]
        enc = processor.encode_chat([messages], add_generation_prompt=True, padding=False)
        prompts.append({"id": str(i), "prompt": messages, "input_ids": np.asarray(enc["input_ids"][0]),
                        "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]})  # fmt: skip
    prompt_len = max(p["input_ids"].size for p in prompts)
    patches = max(int(p["pixel_values"].shape[0]) for p in prompts)
    vc = config.vision
    ids = dict(pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
               video_token_id=processor.video_token_id, merge_size=vc.spatial_merge_size,
               patch_size=vc.patch_size, window_size=vc.window_size,
               tokens_per_second=vc.tokens_per_second)  # fmt: skip
    prompt_spec = BatchSpec(batch_size=P, seq_buckets=(prompt_len,), image_patches=P * patches, max_images=P,
                            padding_side="left", **ids)  # fmt: skip
    train_spec = BatchSpec(batch_size=B, seq_buckets=(prompt_len + N,), image_patches=B * patches,
                           max_images=B, **ids)  # fmt: skip
    sampling = SamplingConfig(num_generations=G, max_completion_length=N, temperature=1.0, top_p=1.0, top_k=0)
    # EOS suppressed as well: no row can stop early (transformers' min_new_tokens masks the same ids).
    suppress = tuple(sorted({*suppressed_ids(config), *config.eos_token_id}))
    grpo = {"num_generations": G, "max_completion_length": N, "loss_type": job["loss_type"],
            "beta": job["beta"]}  # fmt: skip
    step_kw = grpo_step_kw({"chunk_size": 1024, "grad_accum": P * G // B, "grpo": grpo})

    start = time.perf_counter()
    model = common.build_ours_model(config, job["device"], job["seed"])
    kind = common.check_jax_backend(job["device"])
    optim = OptimConfig(learning_rate=1e-6, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    extra = ()
    if job["beta"]:  # the frozen initial policy, as the loop keeps it for non-LoRA GRPO with beta > 0
        initial = jax.tree.map(lambda x: x.copy(), split_model(model)[1])
    graphdef, state, frozen, tx = init_train_state(model, optim)
    del model
    if job["beta"]:
        extra = (unflatten({**flatten(frozen), **flatten(initial)}),)
        del initial
    step_fn = make_train_step("grpo", graphdef, tx, with_ref_params=bool(extra), **step_kw)
    view = sampler_view(graphdef, frozen, None, dtype=config.dtype)  # the loop's generation weights
    setup_s = time.perf_counter() - start

    per_step, tokens = [], None
    for i in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        gen_model = view(state.params)
        jax.block_until_ready(jax.tree.leaves(nnx.state(gen_model)))
        t1 = time.perf_counter()
        rollouts, _ = rollout(gen_model, prompts, prompt_spec, sampling, seed=i, suppress_token_ids=suppress)
        del gen_model  # the step donates the params it holds
        t2 = time.perf_counter()
        if not (rollouts.lengths == N).all():
            raise RuntimeError(f"completions of {sorted(set(rollouts.lengths.tolist()))} tokens, not {N}")
        texts = [processor.tokenizer.decode(rollouts.completion(r).tolist(), skip_special_tokens=True)
                 for r in range(P * G)]  # fmt: skip
        scores = score([reward_fn], [p["prompt"] for p in prompts for _ in range(G)],
                       [[{"role": "assistant", "content": t}] for t in texts],
                       [rollouts.completion(r).tolist() for r in range(P * G)],
                       ids=[f"{p['id']}#{g}" for p in prompts for g in range(G)])  # fmt: skip
        rewards = jnp.asarray(scores.rewards_per_func)
        advantages = np.asarray(losses.grpo_advantages(rewards, num_generations=G))
        micro = micro_batches(prompts, rollouts, advantages, train_spec, num_micro_batches=P * G // B)
        num_items = np.float32(sum(int((mb["labels"] != losses.IGNORE_INDEX).sum()) for mb in micro))
        stacked = stack_micro_batches(micro)
        tokens = int(sum(int(np.asarray(mb["attention_mask"]).astype(bool).sum()) for mb in micro))
        t3 = time.perf_counter()
        state, metrics = step_fn(state, frozen, stacked, num_items, *extra)
        jax.block_until_ready((state, metrics))
        t4 = time.perf_counter()
        per_step.append({"update_weights": t1 - t0, "gen": t2 - t1, "reward": t3 - t2, "old_log_prob": 0.0,
                         "ref": None, "update_actor": t4 - t3, "step": t4 - t0})  # fmt: skip
    metrics = jax.device_get(metrics)
    if int(metrics["skipped"]):
        raise RuntimeError(f"the last step was skipped (loss {float(metrics['loss'])}: not finite)")
    out = _summary(per_step, job["warmup"])
    out["compile_s"] = per_step[0]["step"] - out["timing_s/step"]
    return {**out, **_digest([p["input_ids"] for p in prompts], [p["pixel_values"] for p in prompts]),
            "train_tokens": tokens, "gen_tokens": P * G * N, "last_loss": float(metrics["loss"]),
            "setup_s": setup_s, "peak_bytes": common.jax_peak_bytes(), "device_name": kind}  # fmt: skip


# ------------------------------------------------------------------------------------------------- TRL


def trl(job) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer

    from conversion import tiny_hf

    P, G, N, B = job["prompts"], job["generations"], job["completion_tokens"], job["micro_batch"]
    device = job["device"]
    config = common.model_config(job["preset"])
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    tmp = tempfile.TemporaryDirectory()  # the processor files and TRL's output_dir (nothing is saved)
    processor = tiny_hf.hf_processor(_processor_dir(job, tmp.name))
    processor.tokenizer.padding_side = "left"  # what GRPOTrainer's own AutoProcessor load sets
    start = time.perf_counter()
    model = common.build_hf_model(config, device, job["param_dtype"], job["seed"])
    if job["beta"]:
        # TRL loads the reference from the policy's checkpoint path; these random weights have none, so it
        # gets what that load would give: a copy of the initial policy, in the policy's dtype.
        initial = copy.deepcopy(model)
        grpo_trainer.create_model_from_path = lambda *a, **k: initial
    steps = job["warmup"] + job["steps"]
    args = GRPOConfig(
        output_dir=f"{tmp.name}/trl", per_device_train_batch_size=B, gradient_accumulation_steps=P * G // B,
        num_generations=G, max_completion_length=N, generation_kwargs={"min_new_tokens": N},
        temperature=1.0, top_p=1.0, top_k=0, loss_type=job["loss_type"], beta=job["beta"],
        learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=job["dtype"] == "bfloat16", fp16=False,
        activation_checkpointing=job["remat"] != "none", use_cpu=not cuda, max_steps=steps,
        logging_steps=steps, save_strategy="no", report_to="none", seed=job["seed"], dataloader_num_workers=0,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": PROMPT_TEXT}], "image": im}
                              for im in _images(job)])  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data,
                          processing_class=processor)  # fmt: skip
    setup_s = time.perf_counter() - start

    per_step: list[dict] = []
    now: dict = {}
    seen: dict = {}

    def timed(name, fn, phase):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            key = phase(a, k) if callable(phase) else phase
            if key is not None:
                now[key] = now.get(key, 0.0) + time.perf_counter() - t
            if name == "gen":
                if "prompt_ids" not in seen:
                    seen.update(prompt_ids=[list(p) for p in a[0]], pixels=_split_pixels(a[2]))
                seen.setdefault("completion_lengths", []).extend(len(c) for c in out[0])
                seen["train_tokens"] = sum(len(p) for p in a[0]) + sum(len(c) for c in out[0])
            return out

        return wrapper

    def scoring_phase(a, k):
        if torch.is_grad_enabled():
            return None  # the loss's own forward: part of update_actor
        model_arg = a[0] if a else k.get("model")
        return "ref" if model_arg is trainer.ref_model and model_arg is not None else "old_log_prob"

    trainer._generate_single_turn = timed("gen", trainer._generate_single_turn, "gen")
    trainer._generate_and_score_completions = timed("prep", trainer._generate_and_score_completions, "prep")
    trainer._get_per_token_logps_and_entropies = timed(
        "score", trainer._get_per_token_logps_and_entropies, scoring_phase
    )

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            now.clear()
            now["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step = time.perf_counter() - now["t0"]
            old, ref = now.get("old_log_prob", 0.0), now.get("ref", 0.0)
            per_step.append({"gen": now["gen"], "reward": now["prep"] - now["gen"] - old - ref,
                             "old_log_prob": old, "ref": ref, "update_actor": step - now["prep"],
                             "update_weights": 0.0, "step": step})  # fmt: skip

    trainer.add_callback(StepTimer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        result = trainer.train()
    finally:
        tmp.cleanup()
    if len(per_step) != steps:
        raise RuntimeError(f"{len(per_step)} optimizer steps timed, expected {steps}")
    if set(seen["completion_lengths"]) != {N}:
        raise RuntimeError(f"completions of {sorted(set(seen['completion_lengths']))} tokens, not {N}")
    out = _summary(per_step, job["warmup"])
    return {**out, **_digest(seen["prompt_ids"], seen["pixels"]), "train_tokens": seen["train_tokens"],
            "gen_tokens": P * G * N, "last_loss": float(result.training_loss), "setup_s": setup_s,
            "peak_bytes": common.torch_peak_bytes(device), "device_name": common.device_name(device)}  # fmt: skip


def _split_pixels(fields) -> list:
    """TRL's per-prompt pixel blocks (`pixel_values` of all images, split by `image_grid_thw`)."""
    import numpy as np

    def host(x, dtype):  # a torch tensor or an array, as the processor returned it
        return np.asarray(x.cpu() if hasattr(x, "cpu") else x).astype(dtype)

    grid = host(fields["image_grid_thw"], np.int64)
    return np.split(host(fields["pixel_values"], np.float32), grid.prod(-1).cumsum()[:-1])


# ------------------------------------------------------------------------------------------------ main

COLUMNS = [
    ("side", "side", ""), ("backend", "attention", ""), ("shape", "P x G x N", ""),
    ("gen_tokens_per_s", "rollout tokens/s", ".0f"), ("train_tokens_per_s", "train tokens/s", ".0f"),
    ("timing_s/gen", "gen s", ".3g"), ("timing_s/reward", "reward s", ".3g"),
    ("timing_s/update_actor", "update s", ".3g"), ("timing_s/step", "step s", ".3g"),
    ("compile_s", "compile s", ".3g"), ("peak_gib", "peak GiB", ".1f"), ("status", "status", ""),
]  # fmt: skip


def main(argv=None) -> None:
    p = common.base_parser(__doc__)
    p.set_defaults(sides="ours,trl")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step, P (3B default 8)")
    p.add_argument("--generations", type=int, default=None, help="completions per prompt, G (default 8)")
    p.add_argument(
        "--completion-tokens", type=int, default=None, help="tokens per completion, N (default 256)"
    )
    p.add_argument("--micro-batch", type=int, default=None, help="rows per micro-batch (default 8)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (ours: compilation)")
    p.add_argument("--loss-type", default="dapo", choices=("grpo", "bnpo", "dr_grpo", "dapo"))
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: reference log-probs)")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--backend", default=None, choices=("cudnn", "xla"), help="ours (default cudnn on cuda)")
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(args.worker, {"ours": ours, "trl": trl})
    sides = common.csv(args.sides)
    if not sides or set(sides) - set(SIDES):
        raise SystemExit(f"--sides must be a comma list of {', '.join(SIDES)}, got {args.sides!r}")
    d = DEFAULTS.get(args.preset, DEFAULT)
    pick = {k: getattr(args, k) or d[k] for k in DEFAULT}
    P, G, N, B = pick["prompts"], pick["generations"], pick["completion_tokens"], pick["micro_batch"]
    if G < 2 or (P * G) % B:
        raise SystemExit(f"need G >= 2 and P x G ({P} x {G}) a multiple of --micro-batch ({B})")
    backend = args.backend or ("cudnn" if args.device == "cuda" else "xla")
    report = common.Report("grpo", COLUMNS, args.jsonl)
    results = {}
    for side in sides:
        job = {"side": side, **pick, "image_px": common.image_px(args), "loss_type": args.loss_type,
               "beta": args.beta, "remat": args.remat, "param_dtype": args.param_dtype, "dtype": args.dtype,
               "backend": backend if side == "ours" else "sdpa"}  # fmt: skip
        r = common.run_job(__file__, job, args)
        r["shape"] = f"{P} x {G} x {N}"
        if r["status"] == "ok":
            train_s = sum(r[f"timing_s/{k}"] or 0.0 for k in ("old_log_prob", "ref", "update_actor"))
            r.update(gen_tokens_per_s=r["gen_tokens"] / r["timing_s/gen"],
                     train_tokens_per_s=r["train_tokens"] / train_s,
                     step_tokens_per_s=r["train_tokens"] / r["timing_s/step"],
                     peak_gib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30)  # fmt: skip
            results[side] = r
        report.emit(r)
    if len(results) == 2:
        o, t = results["ours"], results["trl"]
        same = all(o[k] == t[k] for k in ("prompt_ids_sha", "pixels_sha"))
        report.emit({"kind": "ratio", "shape": f"{P} x {G} x {N}",
                     **{f"{k}_ours_over_trl": o[k] / t[k]
                        for k in ("gen_tokens_per_s", "train_tokens_per_s", "step_tokens_per_s")},
                     "same_prompts": same, "same_train_tokens": o["train_tokens"] == t["train_tokens"]},
                    table=False)  # fmt: skip
    report.close()


if __name__ == "__main__":
    main()
