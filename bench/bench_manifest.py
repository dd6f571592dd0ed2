"""Cost of checkpoint manifests (rwkvtune.train.manifest) on a resumable checkpoint of the 0.1B shape.

Usage: python bench/bench_manifest.py [--layers 12] [--embd 768] [--vocab 65536] [--dir /tmp] [--repeat 2]

Builds the checkpoint a full fine-tune saves (fp32 trainable weights, AdamW's exp_avg and
exp_avg_sq, RNG states, sampler, config: 2.3 GB for 0.1B) from random values, then times:
  save      atomic_torch_save of it without a manifest (temp file, fsync, rename): the baseline
  manifest  building the manifest (CRC-32 of every tensor, on the manifest's threads)
  load      torch.load of the saved file (weights_only)
  verify    manifest.verify_pt on what was loaded: checksums, then finiteness of every float tensor
and prints each (best of --repeat) and the manifest's share of a save, verify's of a load.
Needs about 2.5x the checkpoint in free memory (5-6 GB for 0.1B).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_state_dict  # noqa: E402 (after the path insert)

from rwkvtune.models.rwkv7.config import TrainConfig  # noqa: E402
from rwkvtune.train import checkpointing, manifest  # noqa: E402
from rwkvtune.utils import atomic_torch_save, human_bytes, tensor_bytes  # noqa: E402


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()

    sd = make_state_dict(n_layer=a.layers, n_embd=a.embd, head_size=64, vocab=a.vocab, d_decay=64, d_aaa=64,
                         d_mv=32, d_gate=128)
    trainable = {f"model.{k}": v for k, v in sd.items()}
    state = {i: {"step": torch.tensor(10.0), "exp_avg": v * 1e-3, "exp_avg_sq": v * v * 1e-6}
             for i, v in enumerate(trainable.values())}
    groups = [{"lr": 1e-5, "betas": (0.9, 0.99), "eps": 1e-18, "weight_decay": 0.0, "amsgrad": False,
               "params": list(range(len(trainable)))}]
    ck = {"step": 10, "tokens": 40960, "trainable": trainable, "optimizer": {"state": state, "param_groups": groups},
          "sampler": {"epoch": 0, "position": 40, "n": 1000, "seed": 0, "shuffle": True},
          "rng": checkpointing.rng_state(), "config": TrainConfig().to_dict(), "method": {}}
    params = sum(v.numel() for v in trainable.values())
    size = tensor_bytes(ck)
    print(f"checkpoint: {a.layers} layers x {a.embd}, vocab {a.vocab}: {params / 1e6:.1f}M fp32 params + AdamW "
          f"moments = {human_bytes(size)}; {manifest._threads()} hashing thread(s), {torch.get_num_threads()} torch "
          f"thread(s)")

    path = os.path.join(a.dir, f"bench-manifest-{os.getpid()}.pt")
    try:
        t_save, _ = _best(lambda: atomic_torch_save(ck, path), a.repeat)
        t_build, m = _best(lambda: manifest.build(ck), a.repeat)
        atomic_torch_save({**ck, manifest.MANIFEST_KEY: m}, path)
        del ck, trainable, state, sd
        t_load, loaded = _best(lambda: torch.load(path, map_location="cpu", weights_only=True), a.repeat)
        t_verify, _ = _best(lambda: manifest.verify_pt(path, loaded), a.repeat)
        tensors = manifest._tensors(loaded)
        t_crc, _ = _best(lambda: manifest._parallel(lambda n: manifest.tensor_crc(tensors[n]), list(tensors)),
                         a.repeat)
        t_finite, _ = _best(lambda: [manifest.non_finite(t) for t in tensors.values() if t.is_floating_point()],
                            a.repeat)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    print(f"save     {t_save:6.2f} s  (atomic torch.save, fsync, {size / t_save / 1e9:.2f} GB/s)")
    print(f"manifest {t_build:6.2f} s  = {100 * t_build / t_save:.1f}% of a save ({size / t_build / 1e9:.2f} GB/s)")
    print(f"load     {t_load:6.2f} s  (torch.load, weights_only)")
    print(f"verify   {t_verify:6.2f} s  = {100 * t_verify / t_load:.1f}% of a load (checksums {t_crc:.2f} s, "
          f"finiteness {t_finite:.2f} s, names/shapes/dtypes the rest)")
    print(f"manifest write + verify: {t_build + t_verify:.2f} s = {100 * (t_build + t_verify) / t_save:.1f}% of a "
          f"save (write: every save; verify: once per resume)")


if __name__ == "__main__":
    main()
