r"""Reward functions for GRPO: the call convention, loading from a config, scoring, and the built-ins.

Host side only (numpy and the standard library; `math_verify` is imported when a math reward first runs).

**Call convention** (TRL 1.16, spec rl.md 3.3). A reward function is called with keyword arguments only::

    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns) -> list[float | None]

one value per completion. `columns` are every other dataset column, already repeated per completion.
`completions` are strings, or for conversational prompts a list of messages per completion
(`[{"role": "assistant", "content": ...}]`); `completion_text` turns either into the text. `None` means
"cannot score this completion" and becomes NaN in `rewards_per_func`; the advantage code then ignores it.

**Config spec.** `load_rewards` takes a list whose entries are each one of

* a string naming the function:
  - a built-in by its short name: `"accuracy_reward"` (see `BUILTINS`);
  - `"package.module:function"`: imported with `importlib` (the attribute may be dotted, `mod:Class.method`);
  - `"path/to/file.py:function"`: a file loaded as a standalone module (no sibling imports); a relative
    path is resolved against `base_dir` (the config file's folder), else the working directory;
* a mapping with the keys
  - `name` (required): a string as above;
  - `kwargs` (optional): the named object is then a *factory*: it is called once, at load time, with these
    keyword arguments and must return the reward function, e.g.
    `{"name": "get_soft_overlong_punishment", "kwargs": {"max_completion_len": 512, "soft_punish_cache": 64}}`;
  - `weight` (optional, default 1.0): this function's weight in the summed reward (TRL's `reward_weights`);
  - `label` (optional): the name used in metrics and messages; default the function's `__name__`;
* a Python callable (API use, not YAML).

A name that cannot be imported, is not callable, or a factory that fails, raises `RewardError` (a
`ValueError`) with a one-line message naming the spec. Labels must be unique.

**Scoring.** `score(rewards, prompts, completions, completion_ids, columns, ids=..., policy=...)` calls every
function once on the whole batch and returns `Scores.rewards_per_func (N, K)` float32, NaN for None. A
function that raises, returns something that is not a list of N numbers/None, or returns non-finite or
non-numeric values, has *failed*: under `policy="strict"` the run stops with a `RewardError` naming the
function and the record ids; under `policy="skip"` the affected completions score NaN, and
`Scores.failures[label]` counts them (so the loop can log them) with the reason in `Scores.errors`.
Functions (or callable objects) that are `async` are awaited concurrently, as TRL does.

**Built-ins.** `think_format_reward`, `accuracy_reward`, `reasoning_accuracy_reward`,
`get_soft_overlong_punishment`, `get_repetition_penalty_reward`, `get_cosine_scaled_reward` reproduce TRL
1.16's `trl.rewards` value for value (tests/data/trl_vectors.npz `v116/rewards/*`); the gold answer column is
`solution`, as in TRL. One deliberate difference: a conversational completion's text is its *last* message
(TRL reads the first; they agree for the usual single assistant message, and the last is the final answer
after tool turns). Beyond TRL:

* `exact_match_reward`, `multiple_choice_reward` for VQA-style answers (gold column `solution`, else
  `answer`; a list of gold answers means "any of these"). Both first take the *final answer* of a
  completion (`final_answer`): the text after the last `</think>`; inside the last `<answer>...</answer>` in
  it, if any; then inside the last `\boxed{...}` in that, if any.
  Exact match compares `normalize_answer` of both sides: NFKC, lower case, thousands commas between digits
  dropped, every Unicode punctuation character replaced by a space except a decimal point between digits
  and a minus sign that starts a number, the articles a/an/the dropped (unless nothing else is left),
  whitespace collapsed. Multiple choice compares option letters found by `option_letter` ("B", "(B)",
  "B.", "**B**", "Answer: B", "the answer is (B)", "B) text", else the last "(B)"/"[B]" in the text).
  An empty or letterless gold answer scores None.
* `geometry3k_reward(completions, answer)`: EasyR1's `math` reward (examples/reward_function/math.py) used
  for geometry3k: `0.9 * accuracy + 0.1 * format`, after EasyR1's whitespace fix around `<`, `>`, `/`.
  Format is 1 iff the response fully matches `<think>.*</think>.*\boxed{.*}.*`. Accuracy compares the
  content of the last `\boxed{}` with the ground truth: equal after `normalize_answer`, or equal under
  `math_verify` (both wrapped in `\boxed{}`), where EasyR1 uses mathruler's sympy grader; the two agree on
  the usual forms (3/4 = 0.75, 2\sqrt{3} = \sqrt{12}, 45^\circ = 45) and differ on edge cases (mathruler
  insists that unreduced fractions match literally).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RewardFunc = Callable[..., Sequence[float | None]]
POLICIES = ("strict", "skip")
# The names a reward function receives besides the dataset columns.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


class RewardError(ValueError):
    """A reward spec that cannot be loaded, or (policy strict) a reward function that failed; one line."""


@dataclass(frozen=True)
class Reward:
    """A loaded reward function with its label (metric name) and weight."""

    label: str
    func: RewardFunc
    weight: float = 1.0


@dataclass(frozen=True)
class Scores:
    """The result of `score`: rewards (N, K) float32 with NaN for None, and per-function failure counts."""

    rewards_per_func: np.ndarray
    labels: tuple[str, ...]
    weights: np.ndarray  # (K,) float32
    failures: dict[str, int]  # label -> completions scored NaN because the function failed (0 if none)
    errors: tuple[str, ...]  # one line per failure


# ------------------------------------------------------------------------------------------- loading
def load_rewards(specs: Sequence[Any], base_dir: str | Path | None = None) -> list[Reward]:
    """Load a list of reward specs (see the module docstring); labels must be unique."""
    rewards = [load_reward(spec, base_dir) for spec in specs]
    seen: set[str] = set()
    for reward in rewards:
        if reward.label in seen:
            raise RewardError(
                f"two reward functions are labelled {reward.label!r}: give one a distinct `label`"
            )
        seen.add(reward.label)
    return rewards


def load_reward(spec: Any, base_dir: str | Path | None = None) -> Reward:
    """Load one reward spec: a name string, a mapping with `name`/`kwargs`/`weight`/`label`, or a callable."""
    if isinstance(spec, Reward):
        return spec
    if callable(spec):
        return Reward(_func_label(spec, "reward"), spec)
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise RewardError(f"a reward spec must be a name, a mapping or a callable, got {type(spec).__name__}")
    unknown = set(spec) - {"name", "kwargs", "weight", "label"}
    if unknown:
        raise RewardError(f"reward spec {dict(spec)!r}: unknown keys {sorted(unknown)}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise RewardError(f"reward spec {dict(spec)!r}: `name` must be a non-empty string")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RewardError(f"reward {name!r}: `weight` must be a finite number, got {weight!r}")

    obj, attr = _resolve(name, base_dir)
    if not callable(obj):
        raise RewardError(f"reward {name!r} is not callable (it is a {type(obj).__name__})")
    if "kwargs" in spec:
        kwargs = spec["kwargs"]
        if not isinstance(kwargs, Mapping):
            raise RewardError(f"reward {name!r}: `kwargs` must be a mapping, got {type(kwargs).__name__}")
        try:
            func = obj(**kwargs)
        except Exception as e:
            raise RewardError(
                f"reward factory {name!r} failed with kwargs {dict(kwargs)}: {_one_line(e)}"
            ) from e
        if not callable(func):
            raise RewardError(f"reward factory {name!r} returned a {type(func).__name__}, not a function")
    else:
        if name in FACTORIES:
            raise RewardError(f"reward {name!r} is a factory: give its arguments under `kwargs`")
        func = obj
    label = spec.get("label") or _func_label(func, attr)
    return Reward(str(label), func, float(weight))


def _resolve(name: str, base_dir: str | Path | None) -> tuple[Any, str]:
    if ":" not in name:
        if name in BUILTINS:
            return BUILTINS[name], name
        raise RewardError(
            f"unknown reward {name!r}: not a built-in ({', '.join(sorted(BUILTINS))}); "
            "use 'package.module:function' or 'path/to/file.py:function'"
        )
    where, attr = name.rsplit(":", 1)
    if not where or not attr:
        raise RewardError(
            f"reward {name!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(name, where, base_dir)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise RewardError(f"reward {name!r}: cannot import module {where!r}: {_one_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardError(f"reward {name!r}: {where!r} has no attribute {attr!r}") from None
    return obj, attr.rsplit(".", 1)[-1]


def _load_file(name: str, where: str, base_dir: str | Path | None) -> Any:
    path = Path(where).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise RewardError(f"reward {name!r}: no such file {str(path)!r}")
    # One module per resolved file, so two functions from one file share its globals.
    module_name = f"_qwenvl_jax_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward {name!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(f"reward {name!r}: importing {str(path)!r} failed: {_one_line(e)}") from e
    return module


def _func_label(func: Any, default: str) -> str:
    label = getattr(func, "__name__", None)
    return label if isinstance(label, str) and label != "<lambda>" else default


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------- scoring
def score(
    rewards: Sequence[Any],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    ids: Sequence[Any],
    weights: Sequence[float] | None = None,
    policy: str = "strict",
    trainer_state: Any = None,
) -> Scores:
    """Score N completions with K reward functions (or specs); see the module docstring.

    `columns` hold one value per completion; `ids` are the record ids (one per completion) used in messages;
    `weights` override the loaded weights.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    loaded = load_rewards(rewards)
    n = len(completions)
    columns = dict(columns or {})
    for key, values in {"prompts": prompts, "completion_ids": completion_ids, "ids": ids, **columns}.items():
        if len(values) != n:
            raise ValueError(f"{key!r} has {len(values)} entries for {n} completions")
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise ValueError(f"dataset columns {clash} clash with reward-function arguments {RESERVED}")
    if weights is None:
        weights = [r.weight for r in loaded]
    elif len(weights) != len(loaded):
        raise ValueError(f"{len(weights)} weights for {len(loaded)} reward functions")

    kwargs = dict(columns, prompts=prompts, completions=completions, completion_ids=completion_ids,
                  trainer_state=trainer_state)  # fmt: skip
    out = np.full((n, len(loaded)), np.nan, np.float32)
    failures = {r.label: 0 for r in loaded}
    errors: list[str] = []

    def fail(k: int, rows: Sequence[int], problem: str) -> None:
        message = f"reward {loaded[k].label!r} {problem} (records {_ids_text([ids[i] for i in rows])})"
        if policy == "strict":
            for awaitable in pending.values():
                _discard(awaitable)
            raise RewardError(message)
        failures[loaded[k].label] += len(rows)
        errors.append(message)

    def store(k: int, values: Any) -> None:
        column, problem, bad = _check(values, n)
        if problem is not None:
            return fail(k, range(n), problem)
        out[:, k] = column
        if bad:  # left NaN by _check
            fail(k, bad, f"returned non-numeric or non-finite values such as {values[bad[0]]!r}")

    pending: dict[int, Any] = {}
    for k, reward in enumerate(loaded):
        try:
            result = reward.func(**kwargs)
        except Exception as e:
            fail(k, range(n), f"raised {_one_line(e)}")
            continue
        if inspect.isawaitable(result):
            pending[k] = result
        else:
            store(k, result)
    if pending:
        awaited = asyncio.run(_gather(list(pending.values())))
        pending_items = list(pending)
        pending.clear()
        for k, result in zip(pending_items, awaited, strict=True):
            if isinstance(result, Exception):
                fail(k, range(n), f"raised {_one_line(result)}")
            else:
                store(k, result)
    return Scores(
        out, tuple(r.label for r in loaded), np.asarray(weights, np.float32), failures, tuple(errors)
    )


async def _gather(awaitables: list[Any]) -> list[Any]:
    return await asyncio.gather(*awaitables, return_exceptions=True)


def _discard(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)  # an un-awaited coroutine would warn at garbage collection
    if close is not None:
        close()


def _check(values: Any, n: int) -> tuple[np.ndarray, str | None, list[int]]:
    """(column, whole-call problem or None, indices of bad entries)."""
    column = np.full(n, np.nan, np.float32)
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        return column, f"returned a {type(values).__name__}, expected a list of {n} floats or None", []
    if len(values) != n:
        return column, f"returned {len(values)} values for {n} completions", []
    bad = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and not math.isinf(v):
            column[i] = v  # NaN stays NaN, i.e. None
        else:
            bad.append(i)
    return column, None, bad


def _ids_text(ids: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}, ... {len(ids)} in all]" if len(ids) > limit else f"[{shown}]"


# ------------------------------------------------------------------------------------------- text helpers
def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; a message list -> its last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}, ...]
            return "".join(
                p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
            )
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def extract_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    body = start + len("\\boxed{")
    for i in range(body, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[body:i].strip()
            depth -= 1
    return None


def final_answer(text: str) -> str:
    r"""After the last `</think>`; inside the last `<answer>...</answer>`; inside the last `\boxed{}`."""
    text = text.rsplit("</think>", 1)[-1]
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        text = tagged[-1]
    boxed = extract_boxed(text)
    return (boxed if boxed is not None else text).strip()


def normalize_answer(text: str) -> str:
    """Case, punctuation, article and whitespace normalisation for exact match (module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    text = re.sub(r"(?<=\d)\.(?=\d)", "\0", text)  # protect decimal points
    text = re.sub(r"(?<![\w\0])-(?=\d)", "\1", text)  # protect a leading minus sign
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    words = text.replace("\0", ".").replace("\1", "-").split()
    content = [w for w in words if w not in ("a", "an", "the")]
    return " ".join(content or words)


_OPTION_PATTERNS = (
    re.compile(r"^\W*([A-Za-z])\W*$"),  # the whole answer is a letter: "B", "(B)", "B.", "**b**"
    # "Answer: B", "the answer is (B)"
    re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?:?\s*[(\[]?([A-Z])(?![A-Za-z0-9])"),
    re.compile(r"^\s*[(\[]?([A-Z])[.):\]](?:\s|$)"),  # "B. text", "(B) text", "B) text"
    re.compile(r"[(\[]([A-Z])[)\]]"),  # "(B)" or "[B]" anywhere
)


def option_letter(text: str) -> str | None:
    """The multiple-choice letter a text answers with (upper case), or None; patterns in priority order."""
    for pattern in _OPTION_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()  # the last statement is the final answer
    return None


def _gold(kwargs: Mapping[str, Any], func: str) -> Sequence[Any]:
    for key in ("solution", "answer"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise TypeError(f"{func} needs a `solution` or `answer` column")


def _golds(gold: Any) -> list[str]:
    return [str(g) for g in gold] if isinstance(gold, (list, tuple, np.ndarray)) else [str(gold)]


# ------------------------------------------------------------------------------------------- TRL 1.16 built-ins
def think_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 iff the text is `<think>...</think>...` with a single opening `<think>` (TRL 1.16)."""
    pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
    return [
        1.0 if re.match(pattern, completion_text(c), re.DOTALL | re.MULTILINE) else 0.0 for c in completions
    ]


def _math_timeouts() -> tuple[int | None, int | None]:
    # math_verify times out with signal.alarm, which works only in the main thread (as TRL does).
    if threading.current_thread() is threading.main_thread():
        return 10, 5
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    return None, None


def _math_reward(content: str, solution: str, timeouts: tuple[int | None, int | None]) -> float | None:
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    parsing_timeout, verify_timeout = timeouts
    gold = parse(solution, parsing_timeout=parsing_timeout)
    if len(gold) == 0:
        return None
    config = LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True),
        boxed_match_priority=0,  # a boxed answer is tried first
        try_extract_without_anchor=False,
    )
    answer = parse(content, extraction_config=[config], extraction_mode="first_match",
                   parsing_timeout=parsing_timeout)  # fmt: skip
    return float(verify(gold, answer, timeout_seconds=verify_timeout))


def accuracy_reward(completions: Sequence[Any], solution: Sequence[str], **kwargs: Any) -> list[float | None]:
    """math_verify equivalence of the completion's first (boxed-first) answer with `solution` (TRL 1.16)."""
    timeouts = _math_timeouts()
    return [_math_reward(completion_text(c), s, timeouts) for c, s in zip(completions, solution, strict=True)]


def reasoning_accuracy_reward(
    completions: Sequence[Any],
    solution: Sequence[str],
    reasoning_delimiters: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """`accuracy_reward` on the text after the last reasoning delimiter; 0.0 without one (TRL 1.16)."""
    delimiters = ["</think>"] if reasoning_delimiters is None else reasoning_delimiters
    timeouts = _math_timeouts()
    rewards: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        content = completion_text(completion)
        delimiter = next((d for d in delimiters if d in content), None)
        # Incomplete reasoning is penalised (0.0), not skipped.
        rewards.append(
            0.0 if delimiter is None else _math_reward(content.split(delimiter)[-1], sol, timeouts)
        )
    return rewards


class _SoftOverlongPunishment:
    # Callable classes rather than closures keep the built-ins picklable (worker processes).
    __name__ = "soft_overlong_punishment_reward"

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        start = self.max_completion_len - self.soft_punish_cache
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                rewards.append(0.0)
            elif length <= self.max_completion_len:
                rewards.append((start - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> RewardFunc:
    """DAPO eq. 13: 0 up to `L - C` tokens, then linear down to -1 at `L`, -1 beyond (TRL 1.16)."""
    return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class _RepetitionPenalty:
    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float):
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty

    def __call__(self, completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        rewards = []
        for ids in completion_ids:
            ids = list(ids)
            if len(ids) < self.ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(zip(*[ids[i:] for i in range(self.ngram_size)], strict=False))
            scaling = 1 - len(set(ngrams)) / len(ngrams)
            rewards.append(scaling * self.max_penalty if scaling else 0.0)
        return rewards


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFunc:
    """`(1 - #unique token n-grams / #n-grams) * max_penalty`; 0.0 under `ngram_size` tokens (TRL 1.16)."""
    if ngram_size <= 0:
        raise ValueError(f"ngram_size must be greater than 0, got {ngram_size}")
    if max_penalty > 0:
        raise ValueError(f"max_penalty {max_penalty} should not be positive")
    return _RepetitionPenalty(ngram_size, max_penalty)


class _CosineScaledReward:
    __name__ = "cosine_scaled_reward"

    def __init__(
        self, max_len: int, min_wrong: float, max_wrong: float, min_correct: float, max_correct: float
    ):
        self.max_len = max_len
        self.wrong = (max_wrong, min_wrong)  # bounds swapped: a short wrong answer is penalised most
        self.correct = (min_correct, max_correct)

    def __call__(self, completions: Sequence[Any], solution: Sequence[str], completion_ids: Sequence[Sequence[int]],
                 **kwargs: Any) -> list[float | None]:  # fmt: skip
        rewards: list[float | None] = []
        correct = accuracy_reward(completions, solution)
        for is_correct, ids in zip(correct, completion_ids, strict=True):
            if is_correct is None:
                rewards.append(None)
                continue
            # Clamped: cos is periodic and would reward completions longer than max_len again.
            cosine = math.cos(min(len(ids) / self.max_len, 1.0) * math.pi)
            lo, hi = self.correct if is_correct else self.wrong
            rewards.append(float(lo + 0.5 * (hi - lo) * (1.0 + cosine)))
        return rewards


def get_cosine_scaled_reward(
    max_len: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> RewardFunc:
    """`v_min + (v_max - v_min)(1 + cos(pi min(len/max_len, 1)))/2` with `accuracy_reward` picking the bounds."""
    return _CosineScaledReward(
        max_len, min_value_wrong, max_value_wrong, min_value_correct, max_value_correct
    )


# ------------------------------------------------------------------------------------------- VQA and geometry3k
def exact_match_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 iff `normalize_answer(final_answer(completion))` equals a normalised gold answer; None if gold is empty."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, _gold(kwargs, "exact_match_reward"), strict=True):
        golds = {g for g in map(normalize_answer, _golds(gold)) if g}
        if not golds:
            rewards.append(None)
            continue
        rewards.append(float(normalize_answer(final_answer(completion_text(completion))) in golds))
    return rewards


def multiple_choice_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 iff the option letter of the final answer is a gold letter; None if the gold has no letter."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, _gold(kwargs, "multiple_choice_reward"), strict=True):
        golds = {g for g in map(option_letter, _golds(gold)) if g is not None}
        if not golds:
            rewards.append(None)
            continue
        rewards.append(float(option_letter(final_answer(completion_text(completion))) in golds))
    return rewards


def _boxed_equal(given: str, truth: str) -> bool:
    from math_verify import parse, verify

    if normalize_answer(given) == normalize_answer(truth):
        return True
    timeouts = _math_timeouts()
    gold = parse(f"\\boxed{{{truth}}}", parsing_timeout=timeouts[0])
    answer = parse(f"\\boxed{{{given}}}", parsing_timeout=timeouts[0])
    return bool(gold) and bool(answer) and verify(gold, answer, timeout_seconds=timeouts[1])


def geometry3k_reward(completions: Sequence[Any], answer: Sequence[str], format_weight: float = 0.1,
                      **kwargs: Any) -> list[float]:  # fmt: skip
    r"""EasyR1's math reward: `(1 - w) * boxed accuracy + w * <think>...</think>...\boxed{} format`."""
    rewards = []
    for completion, truth in zip(completions, answer, strict=True):
        # EasyR1 drops whitespace around <, > and / first (Qwen2.5-VL-32B writes "< think >").
        response = re.sub(r"\s*(<|>|/)\s*", r"\1", completion_text(completion))
        fmt = float(re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", response, re.DOTALL) is not None)
        given = extract_boxed(response)
        accuracy = float(given is not None and _boxed_equal(given, str(truth).strip().strip("$")))
        rewards.append((1 - format_weight) * accuracy + format_weight * fmt)
    return rewards


BUILTINS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (
        think_format_reward,
        accuracy_reward,
        reasoning_accuracy_reward,
        exact_match_reward,
        multiple_choice_reward,
        geometry3k_reward,
        get_soft_overlong_punishment,
        get_repetition_penalty_reward,
        get_cosine_scaled_reward,
    )
}
FACTORIES = ("get_soft_overlong_punishment", "get_repetition_penalty_reward", "get_cosine_scaled_reward")


def failure_metrics(scores: Scores) -> dict[str, float]:
    """`rewards/<label>/failures` of each reward function that failed on some completions (scored NaN
    under `reward_policy: skip`), counted over every process's rows of the generation batch."""
    from qwenvl_jax import distributed as dist

    counts = np.asarray([scores.failures.get(label, 0) for label in scores.labels], np.int64)
    counts = dist.allgather(counts).sum(0)
    return {
        f"rewards/{label}/failures": float(n) for label, n in zip(scores.labels, counts, strict=True) if n
    }
