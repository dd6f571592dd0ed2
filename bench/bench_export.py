"""Peak memory and time of `export_hf` on a random checkpoint much larger than one tensor.

Usage: python bench/bench_export.py [--vocab 65536] [--layers 24] [--embd 1024] [--dir /tmp]
Writes a random official-layout .pth (fp32; by default the 0.4B shape, 1.8 GB, whose largest
tensors are emb/head, V x C = 268 MB), then in fresh child processes (so each measures only
itself) exports it to an HF folder and, for comparison, reads every tensor through
torch.load(mmap=True). Prints the file size, the largest tensor, and per run the wall time
and the peak resident memory above the process's own resident memory just before the call
(VmHWM - VmRSS from /proc/self/status).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_state_dict  # noqa: E402 (after the path insert)

CHILD = """
import sys, time
import torch
from rwkvtune.convert.hf import export_hf
def kb(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])
before = kb('VmRSS:')
t = time.perf_counter()
if sys.argv[1] == 'export':
    export_hf(sys.argv[2], sys.argv[3])
else:  # what a mapped reader costs: every tensor touched once, one at a time
    sd = torch.load(sys.argv[2], mmap=True, weights_only=True)
    for v in sd.values():
        v.clone()
print(time.perf_counter() - t, (kb('VmHWM:') - before) * 1024)
"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--embd", type=int, default=1024)
    p.add_argument("--dir", default=tempfile.gettempdir())
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        sd = make_state_dict(n_layer=a.layers, n_embd=a.embd, head_size=64, vocab=a.vocab, d_decay=64, d_aaa=64,
                             d_mv=32, d_gate=128)
        src = os.path.join(d, "big.pth")
        torch.save(sd, src)
        largest = max(v.numel() * v.element_size() for v in sd.values())
        del sd
        print(f"checkpoint {os.path.getsize(src) / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB")
        for kind in ("export", "mmap-read"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, kind, src, os.path.join(d, "out")],
                               capture_output=True, text=True, check=True)
            secs, growth = r.stdout.split()
            print(f"{kind:10s} {float(secs):6.1f} s   peak RSS above start {int(growth) / 1e6:7.0f} MB   "
                  f"(child wall {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
