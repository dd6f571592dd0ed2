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


@pytest.fixture(autouse=True)
def _messages_to_stderr():
    """Every test starts with messages going to stderr: a progress line a test left open (its run
    raised, or it built one by hand) must not swallow the next test's messages."""
    from rwkvtune import log

    log.set_sink(None)
    yield
    log.set_sink(None)
