"""keep_freed_memory: on CPU, glibc keeps freed memory between training steps instead of unmapping it
(fewer page faults; the training itself is unchanged)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPE = os.path.join(ROOT, "examples", "recipes", "quickstart.yaml")


def _train(out, *extra):
    """Two quickstart steps in a child process: (its output, final loss, its minor page faults)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    proc = subprocess.run([sys.executable, "-m", "rwkvtune", "train", "--config", RECIPE, "--out", str(out),
                           "--max-steps", "2", "eval_data=null", "tensorboard=false", "save_every=0", "threads=1",
                           *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    return proc.stdout + proc.stderr, json.loads((out / "summary.json").read_text())["loss"], faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (mallopt) on Linux")
def test_keep_freed_memory_faults_in_fewer_pages_and_trains_the_same(tmp_path):
    # Measured here: 10 quickstart steps 4.7 M -> 0.66 M minor faults, 2 steps about 1.1 M -> 0.6 M
    # (most of what is left is start-up: imports, the model, the data).
    out_plain, loss_plain, faults_plain = _train(tmp_path / "plain")
    out_kept, loss_kept, faults_kept = _train(tmp_path / "kept", "--keep-freed-memory")
    assert "glibc keeps freed memory" not in out_plain
    assert "keep_freed_memory: glibc keeps freed memory for the next step" in out_kept
    assert loss_kept == loss_plain
    assert faults_kept < 0.8 * faults_plain, (faults_kept, faults_plain)
