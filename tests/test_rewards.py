"""Reward specs: each built-in on hand-made completions, user files, weighting and every error."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rwkvtune.errors import ConfigError
from rwkvtune.train.reward_worker import start_rewards
from rwkvtune.train.rewards import RewardError, compute_rewards, parse_reward, parse_rewards


@contextlib.contextmanager
def started(specs, timeout=10.0):
    """The parsed specs, running in a reward worker (as in a run), closed afterwards."""
    funcs = parse_rewards(specs)
    worker = start_rewards(funcs, timeout)
    try:
        yield funcs
    finally:
        worker.close()


def score(spec, completions, **fields):
    prompts = ["p"] * len(completions)
    return parse_reward(spec)(prompts, completions, **fields)


# ---- built-ins -----------------------------------------------------------------------------------


def test_exact_match_final_answer_rules():
    completions = [
        "3 + 4 = 7, so 7 * 10 = 70... no: #### 72",  # after the last ####
        "First 12, then 60. The answer is 72.",  # no ####: the last number
        "The total is 72.0 apples",  # numbers compare numerically
        "#### $1,234.",  # "$", thousands commas and a trailing "." still read as a number
        "It is 71",
        "  Paris ",  # no number: the stripped text
        "paris",  # strings are case-sensitive
    ]
    answers = ["Natalia sold 48/2 = 24 clips... #### 72", "72", "72", "1234", "72", "Paris", "Paris"]
    assert score("exact_match:answer", completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_exact_match_numeric_field_and_negative_decimals():
    assert score("exact_match:gold", ["so x = -0.5", "x = 0.5", "42"], gold=[-0.5, -0.5, 42]) == [1.0, 0.0, 1.0]


def test_regex_searches_anywhere_with_inline_flags():
    completions = ["the ANSWER: 5", "answer\nis: 5", "no"]
    assert score("regex:answer: \\d", completions) == [0.0, 0.0, 0.0]  # case-sensitive, pattern with ':'
    assert score("regex:(?i)answer: \\d", completions) == [1.0, 0.0, 0.0]
    assert score("regex:(?is)answer.*: 5", completions) == [1.0, 1.0, 0.0]


def test_format_requires_a_full_match_of_the_stripped_completion():
    completions = ["  <b>hi</b>\n", "<b>hi</b> extra", "<b>two\nlines</b>"]
    assert score("format:<b>.*</b>", completions) == [1.0, 0.0, 1.0]  # "." matches newlines


def test_named_formats():
    completions = [
        "<think>a\nb</think>\n42",
        "<think>a</think>   ",  # no answer after the thinking
        "42 <think>a</think> 42",  # something before <think>
        "<think>x</think>\n<answer>42</answer>",
        "<think>x</think><answer>42</answer> and more",
    ]
    assert score("format:@think", completions) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert score("format:@think_answer", completions) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert score("format:\\@x", ["@x", "x"]) == [1.0, 0.0]  # a literal @ is escaped


def test_length_penalty_grows_past_the_target():
    # target 10 characters: 0 up to 10, then -(len - 10) / 10
    assert score("length_penalty:10", ["a" * 5, "a" * 10, "a" * 15, "a" * 30]) == [0.0, 0.0, -0.5, -2.0]


# ---- user functions ------------------------------------------------------------------------------

USER_FILE = '''
from dataclasses import dataclass

@dataclass
class Cfg:  # needs its module registered while the file runs
    bonus: float = 0.5

def correctness(prompts, completions, answer, **fields):
    return [1.0 + Cfg().bonus if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def boom(prompts, completions, **fields):
    raise KeyError("no_such_column")

def short(prompts, completions, **fields):
    return [1.0]

def strings(prompts, completions, **fields):
    return ["1"] * len(completions)

def nan(prompts, completions, **fields):
    return [float("nan")] * len(completions)

def nones(prompts, completions, **fields):
    return [None] * len(completions)

def not_a_list(prompts, completions, **fields):
    return 1.0

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_user_function_from_file(user_file):
    with started([f"{user_file}:correctness"]) as (func,):
        assert func.name == "my_rewards.correctness" and func.source == str(user_file.resolve())
        assert func(["p", "q"], [" 7", "8"], answer=["7", "9"]) == [1.5, 0.0]


@pytest.mark.parametrize("name, match", [
    ("missing", r"defines no 'missing'; functions defined there: boom, correctness, nan, .*strings"),
    ("NOT_CALLABLE", "has a non-callable 'NOT_CALLABLE'"),
    ("not-a-name", "'not-a-name' is not a Python function name"),
])
def test_user_function_name_errors(user_file, name, match):
    with pytest.raises(ConfigError, match=match):
        with started([f"{user_file}:{name}"]):
            pass


def test_user_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"file .*nowhere\.py not found; give PATH\.py:FUNCTION"):
        parse_reward(f"{tmp_path / 'nowhere.py'}:f")
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_module_here\n")
    with pytest.raises(ConfigError, match=r"importing .*bad\.py raised ModuleNotFoundError: No module named "
                                          r"'no_such_module_here'; fix that file"):
        with started([f"{bad}:f"]):
            pass


# ---- parsing errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, match", [
    ("bleu", r"--reward 'bleu': not a reward spec; expected exact_match:FIELD, regex:PATTERN"),
    ("exact_match", "exact_match needs an argument after ':'"),
    ("regex:(unclosed", r"invalid regular expression '\(unclosed' \(missing \), unterminated subpattern"),
    ("format:@yaml", "unknown named format '@yaml'; named formats: @think, @think_answer"),
    ("length_penalty:0", "length_penalty needs a target length in characters, an integer >= 1, found '0'"),
    ("length_penalty:ten", "found 'ten'"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_reward(spec)


def test_parse_rewards_refuses_none_and_duplicates():
    with pytest.raises(ConfigError, match="at least one reward function is needed"):
        parse_rewards([])
    with pytest.raises(ConfigError, match="'regex:a' given twice"):
        parse_rewards(["regex:a", "length_penalty:5", "regex:a"])


# ---- compute_rewards -----------------------------------------------------------------------------


def test_compute_rewards_weights_and_columns(user_file):
    with started(["exact_match:answer", "length_penalty:4", f"{user_file}:correctness"]) as funcs:
        completions = ["#### 7", "12345678", "7"]
        total, per = compute_rewards(funcs, [2.0, 0.5, -1.0], ["a", "b", "c"], completions,
                                     {"answer": ["7", "8", "7"]})
        # exact_match: 1, 0, 1; length_penalty (target 4): -(6-4)/4, -(8-4)/4, 0; correctness: 0, 0, 1.5
        assert per.tolist() == [[1.0, -0.5, 0.0], [0.0, -1.0, 0.0], [1.0, 0.0, 1.5]]
        assert total.tolist() == [2.0 - 0.25, -0.5, 2.0 - 1.5]
        assert per.dtype == total.dtype == torch.float32
        total, _ = compute_rewards(funcs, None, ["a", "b", "c"], completions, {"answer": ["7", "8", "7"]})
        assert total.tolist() == [0.5, -1.0, 2.5]  # no weights: 1.0 each


def test_compute_rewards_weight_count_must_match():
    with pytest.raises(ConfigError, match=r"reward_weights: expected 2 weights \(one per --reward\), found 3"):
        compute_rewards(parse_rewards(["regex:a", "regex:b"]), [1.0, 1.0, 1.0], ["p"], ["a"])


@pytest.mark.parametrize("name, match", [
    ("boom", r"reward 'my_rewards\.boom' \(from .*my_rewards\.py\) failed: KeyError: 'no_such_column'$"),
    ("short", r"reward 'my_rewards\.short' \(from .*my_rewards\.py\) returned 1 values for 2 completions"),
    ("strings", r"returned '1' \(str\) for completion 0, expected a number"),
    ("nan", r"returned no usable reward for any of the 2 completions \(e\.g\. nan for completion 0\): every value "
            r"was NaN, \+-inf or beyond \+-1e\+06"),
    ("nones", r"returned None \(NoneType\) for completion 0"),
    ("not_a_list", r"returned float, expected a list of 2 numbers"),
])
def test_compute_rewards_names_the_failing_user_function(user_file, name, match):
    with started(["regex:x", f"{user_file}:{name}"]) as funcs:
        with pytest.raises(RewardError, match=match) as e:
            compute_rewards(funcs, None, ["p", "q"], ["x", "y"], {"answer": ["1", "2"]})
    assert "\n" not in str(e.value)


def test_compute_rewards_builtin_missing_field():
    match = r"reward 'exact_match:answer' failed: RewardError: the records have no field 'answer' \(fields: solution\)"
    with pytest.raises(RewardError, match=match):  # in this process
        compute_rewards(parse_rewards(["exact_match:answer"]), None, ["p"], ["1"], {"solution": ["1"]})
    with started(["exact_match:answer"]) as funcs, pytest.raises(RewardError, match=match):  # in the worker
        compute_rewards(funcs, None, ["p"], ["1"], {"solution": ["1"]})


def test_compute_rewards_misaligned_inputs():
    funcs = parse_rewards(["regex:a"])
    with pytest.raises(RewardError, match="2 prompts for 1 completions"):
        compute_rewards(funcs, None, ["p", "q"], ["a"])
    with pytest.raises(RewardError, match="field 'answer' has 1 values for 2 completions"):
        compute_rewards(funcs, None, ["p", "q"], ["a", "b"], {"answer": ["1"]})


def test_compute_rewards_accepts_tensors_and_plain_callables():
    def as_tensor(prompts, completions, **fields):
        return torch.tensor([len(c) for c in completions])

    total, per = compute_rewards([as_tensor], [0.5], ["p", "q"], ["abc", "a"])
    assert total.tolist() == [1.5, 0.5] and per.shape == (2, 1)
