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


# ---- the reward worker: exits, kills, hangs, signals ---------------------------------------------

HOSTILE_FILE = '''
import os, signal, sys, time

def ok(prompts, completions, **fields):
    print("a reward may print")  # reaches the trainer's stdout; the worker's messages have their own pipe
    return [float(len(c)) for c in completions]

def exits(prompts, completions, **fields):
    sys.exit(0)

def exits_bare(prompts, completions, **fields):
    sys.exit()

def interrupts(prompts, completions, **fields):
    raise KeyboardInterrupt

def hard_exit(prompts, completions, **fields):
    os._exit(0)

def killed(prompts, completions, **fields):
    os.kill(os.getpid(), signal.SIGKILL)

def hangs(prompts, completions, **fields):
    time.sleep(60)

def mixed(prompts, completions, **fields):
    return [1.0, float("nan"), float("inf"), 3e38, -2e6, -0.5]

def huge(prompts, completions, **fields):
    return [3e38] * len(completions)

def at_limit(prompts, completions, **fields):
    return [1e6] * len(completions)
'''


@pytest.fixture
def hostile(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_FILE)
    return path


@pytest.mark.parametrize("name, match", [
    ("exits", r"reward 'hostile\.exits' \(from .*hostile\.py\) raised SystemExit\(0\); a reward function must return "
              r"one number per completion, not exit"),
    ("exits_bare", r"reward 'hostile\.exits_bare' \(from .*hostile\.py\) raised SystemExit;"),
    ("interrupts", r"reward 'hostile\.interrupts' \(from .*hostile\.py\) raised KeyboardInterrupt;"),
    ("hard_exit", r"reward 'hostile\.hard_exit' \(from .*hostile\.py\): the reward worker process exited with status 0 "
                  r"\(os\._exit or a crash\) while this function ran"),
    ("killed", r"reward 'hostile\.killed' \(from .*hostile\.py\): the reward worker process was killed by SIGKILL"),
])
def test_a_reward_that_exits_or_dies_stops_with_its_name(hostile, name, match):
    with started([f"{hostile}:ok", f"{hostile}:{name}"]) as funcs:
        worker = funcs[0].worker
        with pytest.raises(RewardError, match=match) as e:
            compute_rewards(funcs, None, ["p", "q"], ["a", "bb"])
        assert "\n" not in str(e.value)
        assert not worker.alive and worker.proc.poll() is not None  # stopped, not left running
        with pytest.raises(RewardError, match="the reward worker process is stopped"):
            funcs[0](["p"], ["a"])


def test_a_worker_killed_between_calls_is_named(hostile):
    import signal

    with started([f"{hostile}:ok"]) as funcs:
        funcs[0].worker.proc.send_signal(signal.SIGKILL)
        funcs[0].worker.proc.wait(10)
        with pytest.raises(RewardError, match=r"reward 'hostile\.ok' \(from .*\): the reward worker process was killed "
                                              r"by SIGKILL \(out of memory\?\) before this function was called"):
            compute_rewards(funcs, None, ["p"], ["a"])


def test_a_reward_that_hangs_is_stopped_at_reward_timeout(hostile):
    import time

    with started([f"{hostile}:hangs"], timeout=1.0) as funcs:
        worker = funcs[0].worker
        t0 = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'hostile\.hangs' \(from .*hostile\.py\) did not return within "
                                              r"reward_timeout=1 s for 2 completions; the worker was stopped"):
            compute_rewards(funcs, None, ["p", "q"], ["a", "b"])
        assert time.monotonic() - t0 < 5  # 1 s, then a kill (no wait for a hung process)
        assert worker.proc.poll() is not None


@pytest.mark.parametrize("body, match", [
    ("import time\ntime.sleep(60)\n", r"--reward '.*slow\.py:f': importing .*slow\.py did not finish within "
                                      r"reward_timeout=1 s; the worker was stopped"),
    ("import sys\nsys.exit(0)\n", r"--reward '.*slow\.py:f': importing raised SystemExit: 0; fix that file"),
    ("import os\nos._exit(3)\n", r"--reward: the reward worker process exited with status 3 .* while importing the "
                                 r"reward files \(.*slow\.py:f\); a reward file must not exit at import"),
])
def test_a_reward_file_that_hangs_or_exits_at_import_is_refused(tmp_path, body, match):
    import time

    path = tmp_path / "slow.py"
    path.write_text(body + "def f(prompts, completions, **fields):\n    return [0.0] * len(completions)\n")
    funcs = parse_rewards(["regex:a", f"{path}:f"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        start_rewards(funcs, 1.0)
    assert time.monotonic() - t0 < 5
    assert funcs[1].worker.proc.poll() is not None


def test_the_worker_ignores_ctrl_c_and_prints_through(hostile, capfd):
    """Ctrl-C in a terminal reaches the whole process group: the trainer finishes its step and
    saves, so the worker must survive it; what a reward prints reaches the trainer's stdout."""
    import signal

    with started([f"{hostile}:ok"]) as funcs:
        funcs[0].worker.proc.send_signal(signal.SIGINT)
        funcs[0].worker.proc.send_signal(signal.SIGTERM)
        total, _ = compute_rewards(funcs, None, ["p", "q"], ["a", "bbb"])
        assert total.tolist() == [1.0, 3.0]
    assert "a reward may print" in capfd.readouterr().out


def test_the_worker_exits_when_its_trainer_is_killed(hostile, tmp_path):
    """A trainer killed hard (no cleanup) leaves no worker behind, even one running a hung reward."""
    import os
    import subprocess
    import sys
    import time

    code = ("import os, sys, threading\n"
            "from rwkvtune.train.rewards import parse_rewards, compute_rewards\n"
            "from rwkvtune.train.reward_worker import start_rewards\n"
            f"funcs = parse_rewards([{str(hostile) + ':hangs'!r}])\n"
            "worker = start_rewards(funcs, 30.0)\n"
            "print(worker.proc.pid, flush=True)\n"
            "threading.Timer(0.5, lambda: os._exit(9)).start()\n"
            "compute_rewards(funcs, None, ['p'], ['a'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert res.returncode == 9, res.stderr
    pid = int(res.stdout.split()[0])
    for _ in range(50):  # the watchdog polls every 0.5 s
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail("the reward worker outlived its trainer")


# ---- invalid values, weights, reserved fields ----------------------------------------------------


def test_invalid_rewards_count_zero_and_are_marked(hostile):
    """NaN, +-inf and |r| > 1e6 (3e38 is a float32, but twice it is inf) are NaN in per_function
    and 0 in the total; the valid ones are kept as they are."""
    with started([f"{hostile}:mixed", "regex:x"]) as funcs:
        total, per = compute_rewards(funcs, [2.0, 1.0], ["p"] * 6, ["x", "x", "y", "x", "y", "y"])
    assert per[:, 0].isnan().tolist() == [False, True, True, True, True, False]
    assert total.tolist() == [2.0 + 1.0, 1.0, 0.0, 1.0, 0.0, -1.0]
    assert total.isfinite().all()


def test_a_reward_with_no_valid_value_stops_and_the_weighted_sum_cannot_overflow(hostile):
    with started([f"{hostile}:huge", f"{hostile}:at_limit"]) as (huge, at_limit):
        with pytest.raises(RewardError, match=r"reward 'hostile\.huge' \(from .*hostile\.py\) returned no usable reward "
                                              r"for any of the 2 completions \(e\.g\. 3e\+38 for completion 0\)"):
            compute_rewards([huge], None, ["p", "q"], ["a", "b"])
        total, _ = compute_rewards([at_limit], [1e30], ["p", "q"], ["a", "b"])  # 1e36: still a float32
        assert total.isfinite().all()
        with pytest.raises(RewardError, match=r"reward_weights \[1e\+33\]: the weighted sum of the rewards overflows "
                                              r"fp32"):
            compute_rewards([at_limit], [1e33], ["p", "q"], ["a", "b"])
    with pytest.raises(ConfigError, match=r"reward_weights: found \[nan\], expected finite numbers"):
        compute_rewards(parse_rewards(["regex:a"]), [float("nan")], ["p"], ["a"])


@pytest.mark.parametrize("field", ["prompts", "completions"])
def test_a_field_named_like_a_call_argument_is_refused(field):
    with pytest.raises(RewardError, match=rf"compute_rewards: field '{field}' has the name of an argument every "
                                          rf"reward function is called with \(fn\(prompts, completions, \*\*fields\)\)"):
        compute_rewards(parse_rewards(["regex:a"]), None, ["p"], ["a"], {field: ["x"]})


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_reward_timeout_must_be_finite_and_positive(value):
    from rwkvtune.models.rwkv7.config import TrainConfig

    cfg = TrainConfig(model="m.pth", data="d.jsonl", method="grpo", reward=("regex:a",), reward_timeout=value)
    with pytest.raises(ConfigError, match=rf"reward_timeout: found {value}, expected a finite number with 0 < "
                                         rf"reward_timeout <= 86400 \(seconds"):
        cfg.validate()
    with pytest.raises(ConfigError, match="reward_timeout: found"):
        start_rewards(parse_rewards(["regex:a"]), value)
