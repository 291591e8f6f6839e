r"""Reward functions: TRL 1.16's numbers, loading from config specs, failure policies, VQA and geometry3k.

TRL's values come from tests/data/trl_vectors.npz `v116/rewards/*` (spec rl.md 3.3, made with math_verify
0.9.0); every case there is reproduced exactly, NaN where TRL returns None.
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwenvl_jax.rl import rewards as R

VECTORS = pathlib.Path(__file__).parent / "data" / "trl_vectors.npz"
PREFIX = "v116/rewards/"
INPUTS = {"texts", "solutions", "completion_lengths", "repetition_ids_flat", "repetition_ids_lengths"}


@functools.cache
def vectors():
    with np.load(VECTORS, allow_pickle=False) as f:
        return {k[len(PREFIX) :]: f[k] for k in f.files if k.startswith(PREFIX)}


def _case_names():
    with np.load(VECTORS, allow_pickle=False) as f:
        return sorted(
            k[len(PREFIX) :] for k in f.files if k.startswith(PREFIX) and k[len(PREFIX) :] not in INPUTS
        )


def _text_batch(conversational):
    v = vectors()
    texts = [str(t) for t in v["texts"]]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    completion_ids = [[7] * int(n) for n in v["completion_lengths"]]
    return completions, completion_ids, {"solution": [str(s) for s in v["solutions"]]}


def _repetition_batch(conversational):
    v = vectors()
    flat, lengths = v["repetition_ids_flat"].tolist(), v["repetition_ids_lengths"].tolist()
    completion_ids = [flat[s : s + n] for s, n in zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True)]
    completions = ["x"] * len(completion_ids)
    return completions, completion_ids, {}


# case name -> (reward spec, batch builder)
CASES = {
    "think_format_reward": ("think_format_reward", _text_batch),
    "accuracy_reward": ("accuracy_reward", _text_batch),
    "reasoning_accuracy_reward": ("reasoning_accuracy_reward", _text_batch),
    "soft_overlong_max10_cache4": (
        {
            "name": "get_soft_overlong_punishment",
            "kwargs": {"max_completion_len": 10, "soft_punish_cache": 4},
        },
        _text_batch,
    ),
    "cosine_scaled_maxlen20": ({"name": "get_cosine_scaled_reward", "kwargs": {"max_len": 20}}, _text_batch),
    "repetition_penalty_n2": (
        {"name": "get_repetition_penalty_reward", "kwargs": {"ngram_size": 2, "max_penalty": -1.0}},
        _repetition_batch,
    ),
}


def test_every_trl_reward_case_is_covered():
    assert sorted(CASES) == _case_names()


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "messages"])
@pytest.mark.parametrize("case", _case_names())
def test_trl_116_reward_vectors(case, conversational):
    spec, batch = CASES[case]
    completions, completion_ids, columns = batch(conversational)
    n = len(completions)
    scores = R.score(
        [R.load_reward(spec)], ["p"] * n, completions, completion_ids, columns, ids=list(range(n))
    )
    np.testing.assert_array_equal(scores.rewards_per_func[:, 0], vectors()[case])
    assert scores.failures == {scores.labels[0]: 0} and scores.errors == ()


def test_unparseable_gold_is_none_and_nan():
    completions = [r"\boxed{1}", r"<think>a</think> \boxed{1}"]
    assert R.accuracy_reward(completions, solution=["", "1"]) == [None, 1.0]
    assert R.reasoning_accuracy_reward(completions, solution=["1", ""]) == [0.0, None]
    cosine = R.get_cosine_scaled_reward(max_len=4)
    assert cosine(completions, solution=["", "1"], completion_ids=[[1], [1] * 9]) == [None, 0.5]
    scores = R.score(
        ["accuracy_reward"], ["p", "p"], completions, [[1], [1]], {"solution": ["", "1"]}, ids=["a", "b"]
    )
    np.testing.assert_array_equal(scores.rewards_per_func, [[np.nan], [1.0]])
    assert scores.failures == {"accuracy_reward": 0}


def test_completion_text_forms():
    assert R.completion_text("plain") == "plain"
    assert R.completion_text([{"role": "assistant", "content": "x"}]) == "x"
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}],
        }
    ]
    assert R.completion_text(parts) == "ab"
    tool_turns = [{"role": "assistant", "content": None}, {"role": "tool", "content": "42"},
                  {"role": "assistant", "content": "final"}]  # fmt: skip
    assert R.completion_text(tool_turns) == "final"
    with pytest.raises(TypeError, match="string or a list of messages"):
        R.completion_text(3)


# ------------------------------------------------------------------------------------------- loading
REWARD_MODULE = """
calls = []

def length_reward(completions, **kwargs):
    calls.append(kwargs.get("trainer_state"))
    return [float(len(c)) for c in completions]

def make_bonus(bonus):
    def bonus_reward(completions, **kwargs):
        return [bonus] * len(completions)
    return bonus_reward

class Holder:
    @staticmethod
    def nested(completions, **kwargs):
        return [2.0] * len(completions)

NOT_CALLABLE = 3
"""


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    (tmp_path / "pkg_rewards_mod.py").write_text(REWARD_MODULE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_rewards.py").write_text(REWARD_MODULE)
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("pkg_rewards_mod", None)


def test_load_builtin_module_and_file(reward_dir, monkeypatch):
    builtin = R.load_reward("think_format_reward")
    assert (
        builtin.func is R.think_format_reward
        and builtin.label == "think_format_reward"
        and builtin.weight == 1.0
    )
    by_module = R.load_reward("pkg_rewards_mod:length_reward")
    assert by_module.label == "length_reward" and by_module.func(completions=["ab"]) == [2.0]
    by_file = R.load_reward("sub/my_rewards.py:length_reward", base_dir=reward_dir)
    assert by_file.func(completions=["abc"]) == [3.0]
    assert by_file.func.__module__ != by_module.func.__module__
    # The same file loaded twice is one module (shared globals).
    assert R.load_reward(str(reward_dir / "sub" / "my_rewards.py") + ":length_reward").func is by_file.func
    monkeypatch.chdir(reward_dir / "sub")
    assert R.load_reward("./my_rewards.py:length_reward").func is by_file.func
    assert R.load_reward("pkg_rewards_mod:Holder.nested").func(completions=["a"]) == [2.0]


def test_load_factories_weights_labels(reward_dir):
    loaded = R.load_rewards(
        [
            {
                "name": "get_soft_overlong_punishment",
                "kwargs": {"max_completion_len": 8, "soft_punish_cache": 4},
                "weight": 0.5,
            },
            {"name": "pkg_rewards_mod:make_bonus", "kwargs": {"bonus": 0.25}, "label": "bonus"},
            "accuracy_reward",
        ]
    )
    assert [r.label for r in loaded] == ["soft_overlong_punishment_reward", "bonus", "accuracy_reward"]
    assert [r.weight for r in loaded] == [0.5, 1.0, 1.0]
    assert loaded[0].func(completion_ids=[[0] * 6]) == [-0.5]
    assert loaded[1].func(completions=["a", "b"]) == [0.25, 0.25]
    scores = R.score(loaded, ["p"], ["\\boxed{2}"], [[0] * 6], {"solution": ["2"]}, ids=["r0"])
    np.testing.assert_array_equal(scores.rewards_per_func, [[-0.5, 0.25, 1.0]])
    np.testing.assert_array_equal(scores.weights, [0.5, 1.0, 1.0])
    assert scores.labels == ("soft_overlong_punishment_reward", "bonus", "accuracy_reward")
    np.testing.assert_array_equal(
        R.score(loaded, ["p"], ["x"], [[0]], {"solution": ["2"]}, ids=[0], weights=[1, 2, 3]).weights,
        [1, 2, 3],
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_reward", r"unknown reward 'no_such_reward': not a built-in"),
        (
            "no_such_pkg_xyz.mod:f",
            r"reward 'no_such_pkg_xyz.mod:f': cannot import module 'no_such_pkg_xyz.mod'",
        ),
        (
            "pkg_rewards_mod:missing",
            r"reward 'pkg_rewards_mod:missing': 'pkg_rewards_mod' has no attribute 'missing'",
        ),
        ("pkg_rewards_mod:NOT_CALLABLE", r"reward 'pkg_rewards_mod:NOT_CALLABLE' is not callable"),
        ("missing_dir/nothing.py:f", r"reward 'missing_dir/nothing.py:f': no such file"),
        ("broken.py:f", r"reward 'broken.py:f': importing .* failed: ModuleNotFoundError"),
        ("get_soft_overlong_punishment", r"'get_soft_overlong_punishment' is a factory"),
        (
            {"name": "get_soft_overlong_punishment", "kwargs": {"max_len": 3}},
            r"factory 'get_soft_overlong_punishment' failed .*TypeError",
        ),
        (
            {"name": "pkg_rewards_mod:length_reward", "kwargs": {}},
            r"factory 'pkg_rewards_mod:length_reward' failed",
        ),
        (
            {"name": "get_repetition_penalty_reward", "kwargs": {"max_penalty": 1.0}},
            r"should not be positive",
        ),
        ({"name": "accuracy_reward", "weights": 2}, r"unknown keys \['weights'\]"),
        ({"name": "accuracy_reward", "weight": "2"}, r"'accuracy_reward': `weight` must be a finite number"),
        ({"kwargs": {}}, r"`name` must be a non-empty string"),
        (3, r"must be a name, a mapping or a callable"),
    ],
)
def test_load_errors_are_one_line_and_name_the_spec(reward_dir, spec, match):
    with pytest.raises(R.RewardError, match=match) as info:
        R.load_reward(spec, base_dir=reward_dir)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_duplicate_labels_rejected():
    with pytest.raises(R.RewardError, match="labelled 'accuracy_reward'"):
        R.load_rewards(["accuracy_reward", "accuracy_reward"])
    assert len(R.load_rewards(["accuracy_reward", {"name": "accuracy_reward", "label": "acc2"}])) == 2


# ------------------------------------------------------------------------------------------- scoring
def _good(completions, **kwargs):
    return [1.0] * len(completions)


def _raises(completions, **kwargs):
    raise ZeroDivisionError("boom\nsecond line")


def _short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def _not_a_list(completions, **kwargs):
    return {"r": 1.0}


def _one_bad_value(completions, **kwargs):
    return [1.0, "high", None, float("inf")]


def _numpy_values(completions, **kwargs):
    return np.array([0.5, np.nan, 1.0, 2.0], np.float64)


def _score(funcs, policy):
    return R.score(
        funcs, ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, ids=["r0", "r1", "r2", "r3"], policy=policy
    )


@pytest.mark.parametrize(
    ("func", "match"),
    [
        (
            _raises,
            r"reward '_raises' raised ZeroDivisionError: boom second line \(records \['r0', 'r1', 'r2', 'r3'\]\)",
        ),
        (
            _short,
            r"reward '_short' returned 3 values for 4 completions \(records \['r0', 'r1', 'r2', 'r3'\]\)",
        ),
        (_not_a_list, r"reward '_not_a_list' returned a dict, expected a list of 4 floats or None"),
        (
            _one_bad_value,
            r"reward '_one_bad_value' returned non-numeric or non-finite values such as 'high' \(records \['r1', 'r3'\]\)",
        ),
    ],
)
def test_strict_policy_stops_naming_function_and_records(func, match):
    with pytest.raises(R.RewardError, match=match) as info:
        _score([_good, func], "strict")
    assert "\n" not in str(info.value)


def test_skip_policy_scores_nan_and_counts():
    scores = _score([_good, _raises, _short, _not_a_list, _one_bad_value, _numpy_values], "skip")
    expected = np.array([[1, np.nan, np.nan, np.nan, 1.0, 0.5], [1, np.nan, np.nan, np.nan, np.nan, np.nan],
                         [1, np.nan, np.nan, np.nan, np.nan, 1.0], [1, np.nan, np.nan, np.nan, np.nan, 2.0]])  # fmt: skip
    np.testing.assert_array_equal(scores.rewards_per_func, expected.astype(np.float32))
    assert scores.rewards_per_func.dtype == np.float32
    assert scores.failures == {"_good": 0, "_raises": 4, "_short": 4, "_not_a_list": 4, "_one_bad_value": 2,
                               "_numpy_values": 0}  # fmt: skip
    assert (
        len(scores.errors) == 4
        and "'_one_bad_value'" in scores.errors[3]
        and "['r1', 'r3']" in scores.errors[3]
    )


def test_many_record_ids_are_abbreviated():
    with pytest.raises(R.RewardError, match=r"records \[0, 1, 2, 3, 4, 5, 6, 7, \.\.\. 20 in all\]"):
        R.score([_raises], ["p"] * 20, ["a"] * 20, [[1]] * 20, ids=list(range(20)))


def test_columns_trainer_state_and_keyword_call():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, image_id, **kwargs):
        seen.update(prompts=prompts, ids=completion_ids, state=trainer_state, image_id=image_id, extra=kwargs)
        return [None, 0.5]

    scores = R.score([spy], ["p0", "p0"], ["a", "b"], [[1], [2, 3]], {"image_id": [9, 9]}, ids=[0, 1],
                     trainer_state={"global_step": 3})  # fmt: skip
    np.testing.assert_array_equal(scores.rewards_per_func, [[np.nan], [0.5]])
    assert seen == {"prompts": ["p0", "p0"], "ids": [[1], [2, 3]], "state": {"global_step": 3}, "image_id": [9, 9],
                    "extra": {}}  # fmt: skip
    with pytest.raises(ValueError, match="'image_id' has 1 entries for 2 completions"):
        R.score([spy], ["p", "p"], ["a", "b"], [[1], [1]], {"image_id": [9]}, ids=[0, 1])
    with pytest.raises(ValueError, match="clash"):
        R.score([spy], ["p", "p"], ["a", "b"], [[1], [1]], {"completions": [1, 2]}, ids=[0, 1])
    with pytest.raises(ValueError, match="policy"):
        R.score([spy], ["p", "p"], ["a", "b"], [[1], [1]], ids=[0, 1], policy="ignore")


def test_async_rewards_are_awaited():
    async def async_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    async def async_raises(completions, **kwargs):
        raise RuntimeError("remote judge down")

    scores = _score([async_reward, _good, async_raises], "skip")
    np.testing.assert_array_equal(scores.rewards_per_func[:, :2], [[1, 1]] * 4)
    assert scores.failures["async_raises"] == 4 and "remote judge down" in scores.errors[0]
    with pytest.raises(R.RewardError, match="'async_raises' raised RuntimeError"):
        _score([async_reward, async_raises], "strict")
    with pytest.raises(R.RewardError, match="'_raises'"):  # the pending coroutine is closed, not leaked
        _score([async_reward, _raises], "strict")


# ------------------------------------------------------------------------------------------- VQA answers
def test_final_answer_and_normalisation():
    assert (
        R.final_answer("<think>maybe \\boxed{1}</think> so <answer>The \\boxed{\\frac{1}{2}}</answer>")
        == "\\frac{1}{2}"
    )
    assert R.final_answer("<think>a</think><think>b</think>  Cat  ") == "Cat"
    assert R.final_answer("<answer>x</answer> then <answer> y </answer>") == "y"
    assert R.final_answer("\\boxed{a{b}c} and \\boxed{unclosed") == "\\boxed{a{b}c} and \\boxed{unclosed"
    assert R.extract_boxed("x \\boxed{a{b}c} y") == "a{b}c"
    assert R.normalize_answer("  The  Red-Car!! ") == "red car"
    assert R.normalize_answer("1,000.50") == "1000.50"
    assert R.normalize_answer("-3.5") == "-3.5" != R.normalize_answer("35")
    assert R.normalize_answer("A") == "a"  # an article alone is kept
    assert R.normalize_answer("ＴＨＥ ＣＡＴ.") == "cat"  # NFKC full-width


def test_exact_match_reward():
    completions = [
        "<think>It looks red.</think> Red.",
        [{"role": "assistant", "content": "<answer>the dog</answer>"}],
        "The answer is \\boxed{3.5}",
        "It is a cat",
        "Two",
        "",
    ]
    gold = ["red", "Dog", "3.5", "dog", ["2", "two"], "   "]
    assert R.exact_match_reward(completions, solution=gold) == [1.0, 1.0, 1.0, 0.0, 1.0, None]
    assert R.exact_match_reward(["35"], answer=["3.5"]) == [0.0]
    with pytest.raises(TypeError, match="`solution` or `answer` column"):
        R.exact_match_reward(["x"])


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("**c**", "C"), ("Answer: B", "B"), ("The answer is (D).", "D"),
        ("answer is C", "C"), ("B. a cat", "B"), ("(A) the dog", "A"), ("I think it is (C), not (B)... (A)", "A"),
        ("the answer is a dog", None), ("no letter here", None), ("", None),
    ],
)  # fmt: skip
def test_option_letter(text, letter):
    assert R.option_letter(text) == letter


def test_multiple_choice_reward():
    completions = [
        "<think>A or C? (C) fits.</think> Answer: C",
        "<answer>(B)</answer>",
        "\\boxed{D}",
        "I would say A.",
        [{"role": "assistant", "content": "B. the second"}],
        "C",
    ]
    gold = ["C", "(B) a cat", "B", "A", "B", "not an option"]
    assert R.multiple_choice_reward(completions, solution=gold) == [1.0, 1.0, 0.0, 0.0, 1.0, None]


# ------------------------------------------------------------------------------------------- geometry3k
@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("<think>angles sum</think> The answer is \\boxed{45}", "45", 1.0),
        ("<think>x</think>\\boxed{7}", "6", 0.1),  # format only
        ("<think>x</think> the answer is 45", "45", 0.0),  # no box: neither
        ("\\boxed{45}", "45", 0.9),  # right but no think block
        ("<think>x</think> \\boxed{0.75}", "\\frac{3}{4}", 1.0),
        ("<think>x</think> \\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("<think>x</think> \\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
        ("<think>x</think> \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("<think>x</think> \\boxed{2\\sqrt{3}}", "3\\sqrt{2}", 0.1),
        ("<think>x</think> \\boxed{45^\\circ}", "45", 1.0),
        ("<think>x</think> \\boxed{x = 5}", "5", 1.0),
        ("<think>x</think> \\boxed{5.66}", "4\\sqrt{2}", 0.1),  # rounded, not equal
        ("< think >x< / think > \\boxed{12}", "12", 1.0),  # EasyR1's whitespace fix
        ("<think>x</think> \\boxed{3} then \\boxed{4}", "4", 1.0),  # the last box counts
        ("<think>x</think> \\boxed{}", "4", 0.1),
    ],
)
def test_geometry3k_reward(completion, answer, expected):
    assert R.geometry3k_reward([completion], answer=[answer]) == pytest.approx([expected], abs=1e-12)
    message = [[{"role": "assistant", "content": completion}]]
    assert R.geometry3k_reward(message, answer=[answer]) == pytest.approx([expected], abs=1e-12)


def test_geometry3k_through_score():
    scores = R.score(["geometry3k_reward"], ["p", "p"], ["<think>a</think>\\boxed{3}", "\\boxed{2}"], [[1], [1]],
                     {"answer": ["3", "3"]}, ids=[0, 1])  # fmt: skip
    np.testing.assert_allclose(scores.rewards_per_func[:, 0], [1.0, 0.0])


# ------------------------------------------------------------------------------------------- host side
def test_rewards_module_does_not_import_jax_or_torch():
    code = textwrap.dedent(
        """
        import sys
        import qwenvl_jax.rl
        from qwenvl_jax.rl import rewards
        rewards.accuracy_reward([r"\\boxed{1}"], solution=["1"])
        bad = [m for m in ("jax", "torch", "flax") if m in sys.modules]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
