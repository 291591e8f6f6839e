"""Generation on tiny random checkpoints: greedy ids equal transformers' `generate` (with and without a
repetition penalty), log-probs equal a teacher-forced forward under every sampling option, seeds, `n`
completions from one prefill, stop tokens, errors, and bucketing."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import qwenvl_jax
from conversion import parity, tiny_hf
from qwenvl_jax.generation import (
    TRACE_COUNTS,
    CacheMemoryError,
    engine,
    generate,
    generate_stream,
)
from qwenvl_jax.generation.cache import layer_copy_bytes, slot_bytes
from qwenvl_jax.processing import BatchSpec, InputError, Processor, collate

pytestmark = pytest.mark.usefixtures("highest_precision")


MAX_NEW = 32


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return tiny_hf.save_tiny_model_dir(tmp_path_factory.mktemp("gen_untied"), seed=1)


@pytest.fixture(scope="module")
def setup(untied_dir):
    processor = Processor.from_pretrained(untied_dir)
    return qwenvl_jax.load(untied_dir, dtype="float32"), processor, parity.builtin_inputs(processor)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def _text_batch(processor, texts):
    convs = [[{"role": "user", "content": t}] for t in texts]
    return processor.encode_chat(convs, add_generation_prompt=True, padding_side="left")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3], ids=["plain", "repetition-penalty"])
def test_greedy_ids_equal_transformers_generate(tiny_model_dir, repetition_penalty):
    """Images (a left-padded batch of two prompts of different lengths) and a video, tied and untied:
    32 greedy tokens identical to HF `generate` with the same suppressed tokens, EOS, pad and repetition
    penalty (HF applies it to greedy search too, over the prompt's valid ids and the generated ones)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = qwenvl_jax.load(tiny_model_dir, dtype="float32")
    processor = Processor.from_pretrained(tiny_model_dir)
    cfg = model.config
    suppress = [cfg.image_token_id, cfg.video_token_id]
    cases = parity.builtin_inputs(processor)
    assert (
        cases[0][1]["attention_mask"].sum(-1).tolist()[0] != cases[0][1]["attention_mask"].sum(-1).tolist()[1]
    )
    for _, batch in cases:
        out = qwenvl_jax.generate(
            model, batch, max_new_tokens=MAX_NEW, temperature=0.0, repetition_penalty=repetition_penalty
        )
        with torch.no_grad():
            ref = hf.generate(
                **parity._torch_inputs(batch, torch.float32, "cpu"),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                suppress_tokens=suppress,
                eos_token_id=list(cfg.eos_token_id),
                pad_token_id=processor.pad_token_id,
                repetition_penalty=repetition_penalty,
            )
        ref = ref[:, batch["input_ids"].shape[1] :].numpy()
        ref = np.pad(ref, ((0, 0), (0, MAX_NEW - ref.shape[1])), constant_values=processor.pad_token_id)
        np.testing.assert_array_equal(out.tokens, ref)
        # Not a degenerate comparison: the completions differ between rows and are not one repeated token.
        assert all(len(set(row.tolist())) > 1 for row in out.tokens)
        hit = np.isin(ref, cfg.eos_token_id)
        stops = [int(np.argmax(h)) + 1 if h.any() else MAX_NEW for h in hit]
        assert out.lengths.tolist() == stops
        if repetition_penalty != 1.0:  # the penalty changes the completions (the plain ones repeat tokens)
            plain = qwenvl_jax.generate(model, batch, max_new_tokens=MAX_NEW, temperature=0.0)
            assert (plain.tokens != out.tokens).any(axis=1).all()


def test_collate_output_generates_like_processor_output(setup):
    """`collate(..., padding_side="left")` (static patch budgets, its own positions) = processor output."""
    model, processor, _ = setup
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": _image(84, 112, 0)}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": _image(56, 56, 1)}, {"type": "text", "text": "Describe this image in detail please."}]}],
    ]  # fmt: skip
    raw = processor.encode_chat(convs, add_generation_prompt=True, padding_side="left")
    examples = [processor.encode_chat([c], add_generation_prompt=True, padding=False) for c in convs]
    spec = BatchSpec(
        batch_size=3,  # one all-padding filler row
        seq_buckets=(64, 128),
        image_patches=256,
        max_images=2,
        padding_side="left",
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    static = collate(examples, spec)
    a = generate(model, raw, max_new_tokens=16, temperature=0.0)
    b = generate(model, static, max_new_tokens=16, temperature=0.0)
    np.testing.assert_array_equal(a.tokens, b.tokens[:2])
    np.testing.assert_allclose(a.logprobs, b.logprobs[:2], atol=1e-5)
    assert (
        b.lengths[2] == 0 and b.finish_reasons[2] == "empty" and (b.tokens[2] == processor.pad_token_id).all()
    )


# ------------------------------------------------------------------------------------------ log-probs


def _reference_logprobs(
    model, batch, out, *, temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, suppress=()
):
    """Teacher forcing: our own full forward over prompt + completion, the sampling distribution rebuilt
    in numpy at the position before each completion token, in transformers' order (repetition penalty,
    suppression, temperature, top-k, top-p, min-p)."""
    ids = np.asarray(batch["input_ids"])
    seq, m = ids.shape[1], out.tokens.shape[1]
    rows = out.prompt_index
    keep = np.arange(m)[None, :] < out.lengths[:, None]
    full = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    full["input_ids"] = np.concatenate([ids[rows], np.where(keep, out.tokens, 0)], 1)
    full["attention_mask"] = np.concatenate(
        [np.asarray(batch["attention_mask"])[rows], keep.astype(np.int64)], 1
    )
    assert (np.bincount(rows) == 1).all()  # one completion per prompt: the vision inputs stay as they are
    logits = np.asarray(model(**full), np.float64)[:, seq - 1 : seq - 1 + m]
    x = logits.copy()
    if repetition_penalty != 1.0:  # HF RepetitionPenaltyLogitsProcessor over the row's ids so far
        vocab = x.shape[-1]
        seen = np.zeros((len(rows), vocab), bool)
        for r, i in enumerate(rows):
            seen[r, ids[i][np.asarray(batch["attention_mask"])[i].astype(bool)]] = True
        for t in range(m):
            x[:, t] = np.where(
                seen,
                np.where(x[:, t] < 0, x[:, t] * repetition_penalty, x[:, t] / repetition_penalty),
                x[:, t],
            )
            seen[np.arange(len(rows)), out.tokens[:, t]] |= keep[:, t]
    x[..., list(suppress)] = -np.inf
    if temperature == 0:
        x = logits  # greedy: the model's own distribution
    else:
        x = x / temperature
        if top_k:
            kth = np.sort(x, -1)[..., -top_k][..., None]
            x = np.where(x < kth, -np.inf, x)
        if top_p < 1:  # HF TopPLogitsWarper
            order = np.argsort(x, -1, kind="stable")
            srt = np.take_along_axis(x, order, -1)
            p = np.exp(srt - srt.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            remove = np.cumsum(p, -1) <= 1 - top_p
            remove[..., -1] = False
            np.put_along_axis(x, order, np.where(remove, -np.inf, srt), -1)
        if min_p > 0:  # HF MinPLogitsWarper
            p = np.exp(x - x.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = np.where(p < min_p * p.max(-1, keepdims=True), -np.inf, x)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    return np.where(keep, picked, 0.0)


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=40, top_p=0.9),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.8, repetition_penalty=1.3),
        dict(temperature=0.7, top_k=100, top_p=0.95, min_p=0.1, repetition_penalty=0.8),
        dict(temperature=0.0, repetition_penalty=1.3),
    ],
    ids=["greedy", "t1", "t0.7-topk-topp", "t1-minp", "t0.8-reppen", "t0.7-all", "greedy-reppen"],
)
def test_logprobs_equal_teacher_forced_forward(setup, sampling):
    """Sampled: log-probs of the processed distribution the token was drawn from. Greedy (also with a
    repetition penalty, which only steers the argmax): the model's own log-probs."""
    model, _, cases = setup
    _, batch = cases[0]
    out = generate(model, batch, max_new_tokens=24, seed=5, **sampling)
    cfg = model.config
    suppress = (cfg.image_token_id, cfg.video_token_id)
    ref = _reference_logprobs(model, batch, out, suppress=suppress, **sampling)
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-4)
    assert np.isfinite(out.logprobs).all() and (out.logprobs[:, :3] < 0).all()
    if sampling.get("top_k"):  # every sampled token is inside the top-k of the raw logits
        assert (out.logprobs > -np.inf).all()
    new = {k: sampling[k] for k in ("min_p", "repetition_penalty") if k in sampling}
    if new and sampling["temperature"] > 0:  # not a vacuous check: each option changes the distribution
        for k in new:
            without = _reference_logprobs(
                model, batch, out, suppress=suppress, **{**sampling, k: 0.0 if k == "min_p" else 1.0}
            )
            assert np.abs(without - ref).max() > 1e-2, k


# ------------------------------------------------------------------------------------ seeds and n


def test_seeds_streaming_and_n_completions_share_one_prefill(setup, monkeypatch):
    model, _, cases = setup
    _, batch = cases[0]
    calls = []
    real_prefill = engine._prefill

    def counting_prefill(graphdef, params, inputs, **kw):
        calls.append((inputs["input_ids"].shape[0], kw["n"]))
        return real_prefill(graphdef, params, inputs, **kw)

    monkeypatch.setattr(engine, "_prefill", counting_prefill)
    kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, n=4, stop_token_ids=())
    a = generate(model, batch, seed=0, **kw)
    assert calls == [(2, 4)]  # one prefill of the 2 prompts (one vision pass) for 8 completions
    assert a.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert a.tokens.shape == (8, MAX_NEW) and a.finish_reasons == ["length"] * 8
    assert len({tuple(r) for r in a.tokens.tolist()}) == 8  # distinct samples
    b = generate(model, batch, seed=0, **kw)
    c = generate(model, batch, seed=1, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    # Streaming draws the same tokens as the looped path for the same seed.
    stream = generate_stream(model, batch, seed=0, **kw)
    steps = list(stream)
    assert [s.step for s in steps] == list(range(MAX_NEW))
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), a.tokens)
    np.testing.assert_allclose(np.stack([s.logprobs for s in steps], 1), a.logprobs, atol=1e-5)
    assert steps[-1].done.all() and a.timing["tokens_per_s"] > 0


def test_a_row_draws_the_same_tokens_alone_or_in_a_batch(setup):
    """Each row samples with its own key (`row_ids`): a prompt generated alone, given its rows' ids in a
    bigger request, draws the tokens that request draws for it (a generation batch split over hosts)."""
    model, processor, _ = setup
    kw = dict(max_new_tokens=8, temperature=1.0, n=2, stop_token_ids=(), seed=3)
    both = generate(model, _text_batch(processor, ["a red square", "two blue circles"]), **kw)
    alone = generate(model, _text_batch(processor, ["two blue circles"]), row_ids=[2, 3], **kw)
    np.testing.assert_array_equal(alone.tokens, both.tokens[2:])
    first = generate(model, _text_batch(processor, ["two blue circles"]), **kw)
    assert (first.tokens != alone.tokens).any()  # other ids, other draws
    with pytest.raises(ValueError, match="row_ids must be one integer >= 0 per completion row"):
        generate(model, _text_batch(processor, ["a"]), row_ids=[-1, 0], **kw)


def test_sampling_values_reuse_the_compiled_programs(setup):
    """min_p and repetition_penalty are traced, on and off alike: new values compile nothing, and the
    streaming path (whose presence state is carried across jitted steps) draws what the loop draws."""
    model, _, cases = setup
    _, batch = cases[0]
    kw = dict(max_new_tokens=MAX_NEW, n=4, stop_token_ids=())  # the shapes of the seeds test above
    generate(model, batch, temperature=1.0, **kw)
    list(generate_stream(model, batch, temperature=1.0, **kw))
    before = dict(TRACE_COUNTS)
    outs = {}
    for values in [
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=1.0, repetition_penalty=1.5),
        dict(temperature=0.9, min_p=0.05, repetition_penalty=0.7),
        dict(temperature=0.0, repetition_penalty=1.3),
    ]:
        out = generate(model, batch, seed=3, **kw, **values)
        steps = list(generate_stream(model, batch, seed=3, **kw, **values))
        np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), out.tokens)
        np.testing.assert_allclose(np.stack([s.logprobs for s in steps], 1), out.logprobs, atol=1e-5)
        outs[tuple(values.items())] = out.tokens
    assert dict(TRACE_COUNTS) == before
    assert len({t.tobytes() for t in outs.values()}) == len(outs)  # each setting drew differently


def test_stop_token_ends_a_row(setup):
    model, processor, cases = setup
    _, batch = cases[0]
    free = generate(model, batch, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=())
    row = free.tokens[0].tolist()
    j = next(i for i in range(1, MAX_NEW) if row[i] not in row[:i])  # first step with a new token
    stop = row[j]
    out = generate(model, batch, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[stop])
    assert out.lengths[0] == j + 1 and out.finish_reasons[0] == "stop"
    assert out.tokens[0, : j + 1].tolist() == row[: j + 1]
    assert (out.tokens[0, j + 1 :] == processor.pad_token_id).all() and (out.logprobs[0, j + 1 :] == 0).all()
    np.testing.assert_allclose(out.logprobs[0, : j + 1], free.logprobs[0, : j + 1], atol=1e-6)
    other = free.tokens[1].tolist()
    if stop not in other:
        assert out.finish_reasons[1] == "length" and out.lengths[1] == MAX_NEW
        assert out.tokens[1].tolist() == other


def test_generation_config_stop_ids_end_rows(setup, untied_dir, tmp_path):
    """A checkpoint whose generation_config.json lists a second eos id stops on it too (Qwen: `<|im_end|>`
    in config.json, `<|im_end|>` and `<|endoftext|>` in generation_config.json), loaded from the HF dir,
    from an Orbax checkpoint of it, and from a CheckpointManager-style step dir."""
    import shutil

    from flax import nnx

    from qwenvl_jax.checkpoint import save_params

    model, processor, cases = setup
    _, batch = cases[0]
    eos = model.config.eos_token_id
    assert eos == (322,)
    free = generate(model, batch, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=())
    row = free.tokens[0].tolist()
    before_eos = next((i for i, tok in enumerate(row) if tok in eos), MAX_NEW)
    j = next(i for i in range(1, before_eos) if row[i] not in row[:i])  # a new token before any eos
    second = row[j]
    hf_dir = tmp_path / "hf"
    shutil.copytree(untied_dir, hf_dir)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos[0]
    (hf_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos[0], second]}))

    loaded = qwenvl_jax.load(hf_dir, dtype="float32")
    assert loaded.config.eos_token_id == (*eos, second)
    out = generate(loaded, batch, max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.finish_reasons[0] == "stop" and out.lengths[0] == j + 1
    assert out.tokens[0, : j + 1].tolist() == row[: j + 1]
    assert (out.tokens[0, j + 1 :] == processor.pad_token_id).all()

    # Orbax: generation_config.json is kept beside config.json, which carries the whole list.
    params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    ckpt = save_params(params, tmp_path / "orbax", loaded.config, assets_from=hf_dir)
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == [eos[0], second]
    assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] == [eos[0], second]
    assert qwenvl_jax.load(ckpt, dtype="float32").config.eos_token_id == (*eos, second)
    # A config with the single id still gets the second from generation_config.json, in a step dir too.
    single = save_params(params, tmp_path / "manager" / "7", model.config, assets_from=hf_dir)
    assert json.loads((single / "config.json").read_text())["eos_token_id"] == eos[0]
    for path in (single, single.parent):
        assert qwenvl_jax.load(path, dtype="float32").config.eos_token_id == (*eos, second)


# ------------------------------------------------------------------------------------------ errors


def test_bad_requests_get_clear_errors(setup):
    model, processor, cases = setup
    _, batch = cases[0]
    for kw, pattern in [
        (dict(n=0), "n "),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.3), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_token_ids=[10**6]), "vocabulary"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            generate(model, batch, **{"max_new_tokens": 4, **kw})
    longest = int(np.asarray(batch["attention_mask"]).sum(-1).max())
    with pytest.raises(InputError, match=f"prompt of {longest} tokens does not fit max_length=50"):
        generate(model, batch, max_new_tokens=4, max_length=50)
    with pytest.raises(InputError, match=f"at most {300 - longest} new tokens"):
        generate(model, batch, max_new_tokens=300, max_length=300)
    with pytest.raises(InputError, match="largest prompt bucket"):
        generate(model, batch, max_new_tokens=4, prompt_buckets=(64,))
    right = processor.encode_chat(
        [[{"role": "user", "content": t}] for t in ("Hi", "Describe it")], add_generation_prompt=True
    )
    with pytest.raises(InputError, match="LEFT-padded"):
        generate(model, right, max_new_tokens=4)


def test_cache_memory_check_says_what_fits(setup):
    model, _, cases = setup
    _, batch = cases[0]  # 2 prompts, n=4: 8 cache rows (the shapes of the test above: no new compile)
    bucket = engine.default_bucket(batch["input_ids"].shape[1])
    slots = -(-(bucket + MAX_NEW) // 128) * 128
    per = slot_bytes(model.config)
    # The prompt pass's own keys and values, beside the cache, and the decoder's per-layer weight copies
    # that decode reads for the whole generation.
    resident = layer_copy_bytes(model)
    assert resident == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.text.layers)))
    prefill = 2 * bucket * per + resident
    budget = prefill + 7 * slots * per + 100
    with pytest.raises(CacheMemoryError) as err:
        generate(model, batch, max_new_tokens=MAX_NEW, n=4, max_cache_bytes=budget)
    msg = str(err.value)
    assert (
        f"8 rows x {slots} slots" in msg and "max_cache_bytes" in msg and "per-layer decoder weights" in msg
    )
    assert f"At {slots} slots at most 7 rows fit" in msg
    fit = (budget - prefill) // (8 * per)
    assert f"at 8 rows at most {fit} slots fit" in msg and f"max_new_tokens <= {fit - bucket}" in msg
    # The same request within the budget runs (the check is not an allocation).
    out = generate(model, batch, max_new_tokens=MAX_NEW, n=4, max_cache_bytes=prefill + 8 * slots * per)
    assert out.tokens.shape == (8, MAX_NEW)


# ------------------------------------------------------------------------------------------ bucketing


def test_prompts_in_one_bucket_reuse_the_compiled_programs(setup):
    model, processor, _ = setup
    short = _text_batch(processor, ["Hi"])
    longer = _text_batch(processor, ["Describe the cat on the mat, please."])
    bucket = engine.default_bucket(short["input_ids"].shape[1])
    assert short["input_ids"].shape[1] < longer["input_ids"].shape[1] <= bucket
    kw = dict(temperature=1.0, seed=0)
    first = generate(model, short, max_new_tokens=20, **kw)
    before = dict(TRACE_COUNTS)
    second = generate(model, longer, max_new_tokens=30, **kw)  # same bucket, same cache multiple
    assert dict(TRACE_COUNTS) == before
    assert first.prompt_len == second.prompt_len == bucket and first.cache_len == second.cache_len
    assert second.tokens.shape == (1, 30)
    generate(
        model, _text_batch(processor, ["word " * 40]), max_new_tokens=20, **kw
    )  # next bucket: new shapes
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1


# ------------------------------------------------------------------------------------------ CLI


def test_generate_command_line(untied_dir, tmp_path, capsys):
    from PIL import Image

    from qwenvl_jax.cli import main

    path = tmp_path / "img.png"
    Image.fromarray(_image(56, 84, 3)).save(path)
    base = ["generate", "--model", str(untied_dir), "--image", str(path), "--prompt", "What is it?",
            "--max-new-tokens", "6", "--dtype", "float32"]  # fmt: skip
    assert main([*base, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == len(record["logprobs"]) <= 6
    assert record["finish_reason"] in ("stop", "length") and record["timing"]["tokens_per_s"] > 0
    assert main(base) == 0
    streamed = capsys.readouterr().out
    assert record["text"] in streamed
    assert main([*base, "--top-p", "2"]) == 2
    assert re.search("top_p", capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ decode shapes


def test_prompt_counts_in_one_batch_bucket_reuse_the_compiled_programs(setup):
    """3 and 4 prompts run as 4 rows (the padding row is not returned) with the same programs and the same
    completions for the same prompts; 5 prompts take the next bucket, 8 rows."""
    model, processor, _ = setup
    texts = ["Hi", "Describe the cat.", "What is two plus two?", "Name a colour.", "Count to three."]
    batches = [_text_batch(processor, texts[:count]) for count in (3, 4, 5)]
    assert len({engine.default_bucket(b["input_ids"].shape[1]) for b in batches}) == 1  # one prompt bucket
    assert [engine.default_batch_bucket(c) for c in (1, 2, 3, 4, 5, 8, 9, 17)] == [1, 2, 4, 4, 8, 8, 16, 24]
    kw = dict(max_new_tokens=12, temperature=0.0, stop_token_ids=())
    three = generate(model, batches[0], **kw)
    before = dict(TRACE_COUNTS)
    four = generate(model, batches[1], **kw)
    assert dict(TRACE_COUNTS) == before
    assert three.tokens.shape == (3, 12) and three.logprobs.shape == (3, 12) and four.tokens.shape == (4, 12)
    assert three.prompt_index.tolist() == [0, 1, 2] and three.finish_reasons == ["length"] * 3
    np.testing.assert_array_equal(three.tokens, four.tokens[:3])
    np.testing.assert_allclose(three.logprobs, four.logprobs[:3], atol=1e-6)
    five = generate(model, batches[2], **kw)
    assert five.tokens.shape == (5, 12) and TRACE_COUNTS["prefill"] == before["prefill"] + 1
    np.testing.assert_array_equal(five.tokens[:4], four.tokens)


def test_decode_through_cache_spans_equals_the_teacher_forced_forward(setup):
    """A request whose cache grows (its 128-slot first span fills before the end): the log-probs still
    equal those of a full forward over prompt + completion, streaming draws what the loop draws, and a
    second request of the same shapes compiles nothing."""
    from qwenvl_jax.generation.cache import cache_spans

    model, processor, _ = setup
    batch = _text_batch(processor, ["Hi", "Describe the cat on the mat, please."])  # left-padded
    sampling = dict(temperature=1.0, top_k=40, top_p=0.9)
    kw = dict(max_new_tokens=120, stop_token_ids=(), seed=3, **sampling)
    out = generate(model, batch, **kw)
    assert cache_spans(out.prompt_len, out.cache_len) == (128, 256) and out.prompt_len + 119 > 128
    assert out.finish_reasons == ["length", "length"]
    cfg = model.config
    ref = _reference_logprobs(
        model, batch, out, suppress=(cfg.image_token_id, cfg.video_token_id), **sampling
    )
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-4)
    steps = list(generate_stream(model, batch, **kw))
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), out.tokens)
    np.testing.assert_allclose(np.stack([s.logprobs for s in steps], 1), out.logprobs, atol=1e-5)
    before = dict(TRACE_COUNTS)
    again = generate(model, batch, **{**kw, "seed": 4})
    assert dict(TRACE_COUNTS) == before and (again.tokens != out.tokens).any()


# ------------------------------------------------------------------------------------------ top-k, top-p


def _logits(kind: str, rng, rows: int, vocab: int) -> np.ndarray:
    x = rng.normal(size=(rows, vocab)).astype(np.float32)
    if kind == "peaked":  # a few tokens hold most of the mass
        x[:, rng.integers(0, vocab, 3)] += 9.0
    elif kind == "flat":  # the nucleus spans most of the vocabulary: the sort must run
        x *= 0.01
    elif kind == "ties":  # a coarse grid: many tied logits, at the top-k and top-p cuts too
        x = np.round(x * 2) / 2
    elif kind == "suppressed":  # -inf tokens, as suppression and earlier filters leave them
        x[:, rng.integers(0, vocab, vocab // 3)] = -np.inf
    return x


def test_top_k_top_p_keeps_the_sorted_set_without_sorting():
    """`_top_k_top_p` (the cut found among the largest logits, the sort only when it is not there) keeps
    exactly the set of the sort-based definition, ties at the cut included, on random rows of every
    shape of distribution; both of its paths run."""
    from qwenvl_jax.generation import sampling

    rng = np.random.default_rng(0)
    fast = jax.jit(sampling._top_k_top_p)
    exact = jax.jit(sampling._top_k_top_p_sorted)
    found = jax.jit(lambda x, k, p: sampling._candidate_cut(x, k, p, sampling.NUCLEUS_CANDIDATES)[1])
    paths = set()
    every = (("normal", "peaked", "flat", "ties", "suppressed"), (0, 1, 7, 40, 256, 257, 1000),
             (0.05, 0.3, 0.9, 0.95, 0.999, 1.0))  # fmt: skip
    real = (("normal", "peaked", "ties"), (0, 40, 1000), (0.3, 0.95, 1.0))  # the real vocabulary, fewer
    for (vocab, rows), (kinds, ks, ps) in (((4096, 32), every), ((151936, 4), real)):
        for kind in kinds:
            x = jnp.asarray(_logits(kind, rng, rows, vocab))
            for top_k in ks:
                for top_p in ps:
                    k, p = jnp.int32(top_k), jnp.float32(top_p)
                    got, want = np.asarray(fast(x, k, p)), np.asarray(exact(x, k, p))
                    np.testing.assert_array_equal(got, want, err_msg=f"{vocab} {kind} k={top_k} p={top_p}")
                    paths.add(bool(np.all(found(x, k, p))))
    assert paths == {True, False}


def test_top_k_top_p_common_path_has_no_sort():
    """At the real vocabulary the cut's own computation is a partial top-k (XLA's TopK), and the whole
    filter's program sorts only inside the fallback branch of its conditional."""
    from qwenvl_jax.generation import sampling

    x = jax.ShapeDtypeStruct((64, 151936), jnp.float32)
    k, p = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    cut = jax.jit(lambda x, k, p: sampling._candidate_cut(x, k, p, sampling.NUCLEUS_CANDIDATES))
    cut_hlo = cut.lower(x, k, p).compile().as_text()
    assert "TopK" in cut_hlo and " sort(" not in cut_hlo
    full_hlo = jax.jit(sampling._top_k_top_p).lower(x, k, p).compile().as_text()
    entry = full_hlo[full_hlo.index("\nENTRY") :]
    assert " sort(" in full_hlo and " sort(" not in entry and " conditional(" in entry
