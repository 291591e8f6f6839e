"""`qwenvl-jax` command line.

qwenvl-jax demo [--out DIR] [--fast] [--grpo | --ppo | --qlora]  # offline, CPU: SFT then DPO/GRPO/PPO/QLoRA
qwenvl-jax demo --processor [--model DIR]  # offline: the host pipeline on synthetic images and a video
qwenvl-jax process --model DIR --image PATH_OR_URL [--video PATH] --prompt "..."
qwenvl-jax generate --model DIR --image PATH_OR_URL [--video PATH] --prompt "..." [--json]
qwenvl-jax train --config configs/sft_tiny_cpu.yaml [--set run_dir=/tmp/run --set steps=10] [--dry-run]
qwenvl-jax convert --hf DIR --out DIR      |  qwenvl-jax export --ckpt DIR --out DIR
qwenvl-jax tiny --out DIR                  # a tiny random-weight HF checkpoint, no torch, no downloads
qwenvl-jax parity --hf DIR | --random PRESET [--device cuda] [--real]   # needs torch + transformers
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _synthetic_scene(width: int, height: int, shape: str, color: str, shift: int = 0):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    r = min(width, height) // 4
    cx, cy = width // 3 + shift, height // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def _describe(batch: dict[str, np.ndarray]) -> str:
    lines = [f"  {'key':<24} {'shape':<18} dtype"]
    for key, value in batch.items():
        value = np.asarray(value)
        lines.append(f"  {key:<24} {value.shape!s:<18} {value.dtype}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.processor:
        if args.fast or args.grpo or args.ppo or args.qlora or args.out is not None:
            print(
                "error: --out, --fast, --grpo, --ppo and --qlora apply to the training demo, not to --processor",
                file=sys.stderr,
            )
            return 2
        return _processor_demo(args)
    if args.model:
        print(
            "error: --model applies to the processor demo only (qwenvl-jax demo --processor)", file=sys.stderr
        )
        return 2
    chosen = [flag for flag in ("grpo", "ppo", "qlora") if getattr(args, flag)]
    if len(chosen) > 1:
        print(
            f"error: {' and '.join('--' + f for f in chosen)} are separate demos; choose one", file=sys.stderr
        )
        return 2
    from qwenvl_jax.demo import FAST, FULL, GRPO, GRPO_FAST, PPO, PPO_FAST, QLORA, QLORA_FAST, run_demo

    method = chosen[0] if chosen else "dpo"
    settings = {("dpo", False): FULL, ("dpo", True): FAST, ("grpo", False): GRPO, ("grpo", True): GRPO_FAST,
                ("ppo", False): PPO, ("ppo", True): PPO_FAST, ("qlora", False): QLORA,
                ("qlora", True): QLORA_FAST}  # fmt: skip
    try:
        run_demo(args.out or "qwenvl_jax_demo", settings[method, args.fast])
    except FileExistsError as err:  # an --out that is not the demo's own
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _processor_demo(args: argparse.Namespace) -> int:
    from qwenvl_jax.processing import BatchSpec, Processor, collate
    from qwenvl_jax.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_tiny_checkpoint(Path(tmp) / "tiny-qwen2.5-vl")
        print(
            f"processor files: {model_dir}"
            + ("" if args.model else " (tiny offline checkpoint, 342-token vocab)")
        )
        processor = Processor.from_pretrained(model_dir)
        circle = _synthetic_scene(320, 240, "circle", "red")
        square = _synthetic_scene(150, 200, "square", "blue")
        frames = [_synthetic_scene(224, 168, "triangle", "green", shift=12 * k) for k in range(6)]
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": circle},
                        {"type": "text", "text": "Describe this image."},
                    ],
                },
                {"role": "assistant", "content": "A red circle on a white background."},
            ],
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": frames, "sample_fps": 2.0, "min_pixels": 3136},
                        {"type": "image", "image": square},
                        {"type": "text", "text": "What moved, and what is in the picture?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": "The green triangle moved right. The picture shows a blue square.",
                },
            ],
        ]
        print("\nrendered chat template (conversation 0):")
        print("  " + processor.apply_chat_template(conversations[0]).replace("\n", "\\n\n  "))
        start = time.perf_counter()
        examples = [processor.encode_chat([conv], labels=True, padding=False) for conv in conversations]
        encode_s = time.perf_counter() - start
        spec = BatchSpec(
            batch_size=2,
            seq_buckets=(128, 256, 512, 1024),
            image_patches=1024,
            video_patches=1024,
            max_images=4,
            max_videos=2,
            pad_token_id=processor.pad_token_id,
            image_token_id=processor.image_token_id,
            video_token_id=processor.video_token_id,
        )
        start = time.perf_counter()
        batch = collate(examples, spec)
        collate_s = time.perf_counter() - start
        n_img = int(batch["num_images"])
        n_vid = int(batch["num_videos"])
        print(f"\nencoded 2 conversations ({n_img} images, {n_vid} video) in {encode_s * 1e3:.1f} ms; "
              f"collated into static shapes in {collate_s * 1e3:.1f} ms")  # fmt: skip
        print(f"  image grids (t, h, w): {batch['image_grid_thw'][:n_img].tolist()}")
        print(f"  video grids (t, h, w): {batch['video_grid_thw'][:n_vid].tolist()}, "
              f"second_per_grid_ts {batch['second_per_grid_ts'][:n_vid].tolist()}")  # fmt: skip
        print(
            f"  tokens per row: {batch['attention_mask'].sum(-1).tolist()} in a bucket of {batch['input_ids'].shape[1]}"
        )
        print(f"  trained (assistant) tokens per row: {(batch['labels'] != -100).sum(-1).tolist()}")
        print(f"  rope_deltas: {batch['rope_deltas'][:, 0].tolist()}")
        answer = batch["labels"][0][batch["labels"][0] != -100]
        print(f"  row 0 labels decode to: {processor.tokenizer.decode(answer.tolist())!r}")
        print("\nstatic-shape batch:")
        print(_describe(batch))
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from qwenvl_jax.processing import Processor

    processor = Processor.from_pretrained(args.model)
    content = [{"type": "image", "image": image} for image in args.image]
    content += [{"type": "video", "video": video} for video in args.video]
    content.append({"type": "text", "text": args.prompt})
    conversation = [{"role": "user", "content": content}]
    start = time.perf_counter()
    batch = processor.encode_chat([conversation], add_generation_prompt=True)
    elapsed = time.perf_counter() - start
    print(processor.apply_chat_template(conversation, add_generation_prompt=True))
    print(f"processed in {elapsed * 1e3:.1f} ms")
    print(_describe(batch))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        return _generate(args)
    except ValueError as err:  # bad sampling options, a prompt too long, a cache that does not fit
        print(f"error: {err}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import json

    import qwenvl_jax
    from qwenvl_jax.generation import generate, generate_stream
    from qwenvl_jax.processing import Processor

    processor = Processor.from_pretrained(args.model)
    content = [{"type": "image", "image": image} for image in args.image]
    content += [{"type": "video", "video": video} for video in args.video]
    content.append({"type": "text", "text": args.prompt})
    batch = processor.encode_chat(
        [[{"role": "user", "content": content}]], add_generation_prompt=True, padding_side="left"
    )
    model = qwenvl_jax.load(args.model, dtype=args.dtype)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    decode = processor.tokenizer.decode
    if args.json:
        out = generate(model, batch, **options)
        ids = out.completion(0).tolist()
        record = {
            "token_ids": ids,
            "text": decode(ids, skip_special_tokens=True),
            "logprobs": out.logprobs[0, : len(ids)].tolist(),
            "finish_reason": out.finish_reasons[0],
            "timing": out.timing,
        }
        print(json.dumps(record))
        return 0
    ids: list[int] = []
    shown = ""
    stream = generate_stream(model, batch, **options)
    while True:
        try:
            step = next(stream)
        except StopIteration as stop:
            out = stop.value
            break
        if step.emitted[0]:
            ids.append(int(step.tokens[0]))
            text = decode(ids, skip_special_tokens=True)
            # Hold back an incomplete UTF-8 sequence (a byte-level token may end mid-character).
            if not text.endswith("\ufffd") and text.startswith(shown):
                print(text[len(shown) :], end="", flush=True)
                shown = text
    text = decode(ids, skip_special_tokens=True)
    print(text[len(shown) :] if text.startswith(shown) else "")
    t = out.timing
    print(f"[{len(ids)} tokens, {out.finish_reasons[0]}; prefill {t['prefill_s']:.2f} s, decode "
          f"{t['decode_s']:.2f} s, {t['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from conversion.convert import convert

    start = time.perf_counter()
    out = convert(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    print(f"wrote Orbax checkpoint {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from conversion.convert import export

    start = time.perf_counter()
    out = export(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=True)
    print(f"wrote HF checkpoint {out} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    if args.hf is not None and (args.seed is not None or args.processor is not None):
        print("error: --seed and --processor apply to --random only", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        # torch and JAX share the GPU: without this JAX takes 75 % of it when it starts. Set before
        # anything initialises JAX's backend (importing jax does not).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:  # torch and transformers are test extras, never runtime dependencies
        print(
            f"error: parity compares against transformers and needs the test extras ({', '.join(missing)} "
            "not installed): pip install 'qwenvl-jax[test]'",
            file=sys.stderr,
        )
        return 2
    from conversion import parity

    dtypes = tuple(args.dtype or ("float32", "bfloat16"))
    if args.random is not None:
        results = parity.run_random(args.random, seed=args.seed or 0, processor_dir=args.processor,
                                    dtypes=dtypes, device=args.device)  # fmt: skip
    else:
        results = parity.run(args.hf, dtypes=dtypes, device=args.device)
    full_size = args.real or args.random not in (None, "tiny")
    failures = parity.verdict(results, real_model=args.real, full_size=full_size)
    fp32 = "rtol 1e-3 + atol 2e-2, same argmax" if full_size else "atol 1e-4"
    top1 = ", top-1 >= 99 %" if args.real else " (top-1 reported)"
    print(f"gates: float32 {fp32}; bfloat16 mean |diff| <= 1.5 x HF's own bf16 drift, mean KL <= 1e-3{top1}")
    for failure in failures:
        print(f"FAIL {failure}")
    print("parity: " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


def cmd_train(args: argparse.Namespace) -> int:
    from qwenvl_jax.train.loop import load_config, train

    config = load_config(args.config, args.set)
    if not args.dry_run:
        from qwenvl_jax import distributed as dist

        # Before anything touches a JAX backend: join the other hosts' processes (a no-op for one).
        settings = dist.settings(config.get("distributed"))
        dist.initialize(settings)
        dist.start_watchdog(settings)
        try:
            code = train(config)
        except Exception as err:
            if dist.process_count() > 1:  # a dead peer makes collectives fail here: name it, not the trace
                dist.await_watchdog()
            dist.finished(error=f"{type(err).__name__}: {err}")
            raise
        finally:
            dist.finished()  # a no-op when it ran already
        return code
    from qwenvl_jax.train.config import resolve
    from qwenvl_jax.train.plan import check_step_shapes, format_plan, plan

    config = resolve({**config, "run_dir": config.get("run_dir") or "unused"})  # as a run would check it
    p = plan(config)
    print(format_plan(p))
    checked = check_step_shapes(config)
    print(f"train step traced at full size with jax.eval_shape ({checked.attention_backend} attention): ok")
    return 1 if p.problems else 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from qwenvl_jax.tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny random-weight Qwen2.5-VL checkpoint (HF format) to {out}")
    return 0


TRAIN_EPILOG = """\
resume: a run_dir that holds checkpoints is resumed from its latest loadable step by running the same
  command again (params, optimizer state, rng and the data position are restored, so the losses continue
  exactly). A damaged latest checkpoint is reported and the newest intact one used. A resume whose config
  changes the train state or the data order (model, trainable, lora, seed, data, batch, grad_accum, ...)
  is refused; other changes (steps, learning rate, logging, ...) are reported. One process per run_dir.

exit codes:
  0  finished; run_dir/final written
  1  failed during training (non-finite streak, overflowing update); the last good checkpoint is kept
  2  refused: a config, data, checkpoint or path error (the message names it), run_dir in use, or a
     resume with a changed config; nothing was trained
  3  stopped by SIGTERM or Ctrl-C: checkpoint saved, final/ not written; the same command resumes
  4  finished and final/ written, but more than max_skipped_fraction of the steps were skipped as
     non-finite; read the warning before using the model
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every option's help, and epilogs kept as written."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwenvl-jax")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(
        prog="qwenvl-jax", description="Qwen2.5-VL in JAX/Flax: processing, conversion, generation, training.",
        **fmt,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"qwenvl-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="offline, on the CPU: SFT then DPO, GRPO or PPO of a tiny random-weight model on synthetic images",
        **fmt,
    )
    demo.add_argument("--out", help="output directory (default: ./qwenvl_jax_demo)")
    demo.add_argument("--fast", action="store_true", help="a seconds-long smoke run (a few steps)")
    demo.add_argument(
        "--grpo",
        action="store_true",
        help="SFT then GRPO on the task's reward alone, instead of SFT then DPO",
    )
    demo.add_argument(
        "--ppo",
        action="store_true",
        help="SFT, a reward model on the preference pairs, then PPO against it, instead of SFT then DPO",
    )
    demo.add_argument(
        "--qlora",
        action="store_true",
        help="SFT, then LoRA and QLoRA (an NF4 base) from it side by side, instead of SFT then DPO",
    )
    demo.add_argument(
        "--processor", action="store_true", help="instead: the host pipeline on a tiny checkpoint (no model)"
    )
    demo.add_argument(
        "--model", help="with --processor: an HF Qwen2.5-VL directory to take the processor from"
    )
    demo.set_defaults(func=cmd_demo)
    process = sub.add_parser("process", help="turn a prompt with images/videos into model inputs", **fmt)
    process.add_argument("--model", required=True, help="HF Qwen2.5-VL checkpoint directory")
    process.add_argument(
        "--image", action="append", default=[], help="path, file:// or http(s) URL (repeatable)"
    )
    process.add_argument(
        "--video", action="append", default=[], help="video file or frame directory (repeatable)"
    )
    process.add_argument("--prompt", required=True, help="the user's text")
    process.set_defaults(func=cmd_process)
    gen = sub.add_parser("generate", help="answer a prompt with images/videos, streaming the text", **fmt)
    gen.add_argument(
        "--model", required=True, help="HF Qwen2.5-VL checkpoint directory (or Orbax + processor)"
    )
    gen.add_argument("--image", action="append", default=[], help="path, file:// or http(s) URL (repeatable)")
    gen.add_argument(
        "--video", action="append", default=[], help="video file or frame directory (repeatable)"
    )
    gen.add_argument("--prompt", required=True, help="the user's text")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="compute dtype")
    gen.add_argument("--json", action="store_true", help="print ids, text, log-probs and timing as JSON")
    gen.set_defaults(func=cmd_generate)
    overwrite_help = (
        "replace what the command writes in an existing --out (weights, config, tokenizer files); other "
        "files there are kept. --out may never be the source or inside it"
    )
    convert = sub.add_parser("convert", help="HF Qwen2.5-VL directory -> Orbax checkpoint (atomic)", **fmt)
    convert.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors)")
    convert.add_argument("--out", required=True, help="Orbax checkpoint directory to create")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast on the way (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help=overwrite_help)
    convert.set_defaults(func=cmd_convert)
    export = sub.add_parser("export", help="Orbax checkpoint -> HF directory that transformers loads", **fmt)
    export.add_argument("--ckpt", required=True, help="Orbax checkpoint directory (e.g. run_dir/final)")
    export.add_argument("--out", required=True, help="HF directory to create")
    export.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="default: the dtype it was converted from"
    )
    export.add_argument("--overwrite", action="store_true", help=overwrite_help)
    export.set_defaults(func=cmd_export)
    tiny = sub.add_parser(
        "tiny",
        help="write a tiny random-weight HF checkpoint (no torch, no downloads) to try the commands",
        **fmt,
    )
    tiny.add_argument("--out", required=True, help="directory to create")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    tiny.set_defaults(func=cmd_tiny)
    from qwenvl_jax.config import PRESETS  # pure python, no jax

    parity = sub.add_parser(
        "parity", help="logits of ours vs transformers on built-in prompts (needs the test extras)", **fmt
    )
    source = parity.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF checkpoint directory")
    source.add_argument(
        "--random",
        metavar="PRESET",
        choices=sorted(PRESETS),
        help=f"no checkpoint: random weights of a preset ({', '.join(sorted(PRESETS))}), drawn on the device",
    )
    parity.add_argument("--seed", type=int, help="with --random: weight seed (default 0)")
    parity.add_argument(
        "--processor",
        help="with --random: processor dir with the model's vocabulary (default: built-in token ids)",
    )
    parity.add_argument(
        "--dtype", action="append", choices=["float32", "bfloat16"], help="repeatable (default: both)"
    )
    parity.add_argument("--device", default="cpu", help="torch device for the reference: cpu or cuda")
    parity.add_argument(
        "--real",
        action="store_true",
        help="real-weight gates: float32 rtol 1e-3 + atol 2e-2 and argmax, bf16 top-1 >= 99 %% (--random "
        "with a full-size preset has the float32 gate without this)",
    )
    parity.set_defaults(func=cmd_parity)
    trn = sub.add_parser(
        "train",
        help="SFT, DPO, GRPO, reward-model or PPO run from a YAML config (resumes from run_dir)",
        epilog=TRAIN_EPILOG,
        **fmt,
    )
    trn.add_argument("--config", required=True, help="YAML config (keys: docs/training.md)")
    trn.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a dotted key with a YAML value, e.g. optim.learning_rate=1e-5 (repeatable)",
    )  # fmt: skip
    trn.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-device memory plan and trace the step at full size; allocate nothing",
    )
    trn.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qwenvl_jax.processing.errors import InputError
    from qwenvl_jax.safetensors_io import CheckpointError
    from qwenvl_jax.train.config import ConfigError
    from qwenvl_jax.weights import CheckpointMismatchError

    try:
        return args.func(args)
    except (InputError, CheckpointMismatchError, CheckpointError, ConfigError, FileExistsError,
            FileNotFoundError, NotADirectoryError) as err:  # fmt: skip
        hint = " (on the command line: --overwrite)" if isinstance(err, FileExistsError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from qwenvl_jax.distributed import DistributedError
        from qwenvl_jax.train.loop import TrainingError

        if isinstance(err, DistributedError):  # bad settings or an unreachable coordinator: one line
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not isinstance(err, TrainingError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
