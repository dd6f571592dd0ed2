import os
import sys

# Tests import the helpers module by name; the rwkv oracle needs its v7 switch before import.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_JIT_ON", "0")
# A CPU run without a precision trains in bf16 on CPUs with AVX512-BF16/AMX where it pays
# (rwkvtune/models/cpu_precision.py): the suite's figures are fp32 ones on every machine, also in the
# runs it starts as subprocesses. Tests of the bf16 path and of the choice set it themselves.
os.environ["RWKVTUNE_CPU_PRECISION"] = "fp32"


import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: every torch in the suite on one thread, the workers' own and those
    # of the runs they start (the environment is inherited). Two threads each would put four or
    # more on two cores, where OpenMP's spin-waiting made some runs 7x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# The modules that start many training processes (torchrun included), roughly heaviest first. Two
# workers take whole modules in collection order (--dist loadscope, pyproject's addopts, without
# xdist's reordering by test count, which put these last): starting with the longest keeps one
# worker from finishing a heavy module alone while the other sits idle.
HEAVY_MODULES = ("test_train.py", "test_fsdp_checks.py", "test_memory.py", "test_grpo.py", "test_fsdp.py",
                 "test_dpo.py", "test_manifest.py", "test_quant.py", "test_peft.py", "test_wkv.py",
                 "test_run_as_model.py", "test_lm_eval.py", "test_bf16.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _messages_to_stderr():
    """Every test starts with messages going to stderr: a progress line a test left open (its run
    raised, or it built one by hand) must not swallow the next test's messages."""
    from rwkvtune import log

    log.set_sink(None)
    yield
    log.set_sink(None)
