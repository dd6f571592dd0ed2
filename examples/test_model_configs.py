#!/usr/bin/env python
"""Load and validate every model config in reach and compare each with its model file.

Configs in reach: the package's registry (rwkvtune/configs/models/*.json) plus every *.json in
the directories listed in $RWKVTUNE_CONFIG_PATH. A config whose model file is present (its
model_path: an absolute model_file, or model_file under $RWKVTUNE_MODEL_DIR, default
~/.rwkvtune/models) is compared tensor by tensor with the file's shapes; only the shapes are
read, not the weights. Releases are covered too: every other release of an entry's size that is
present in the models directory or recorded there by `rwkvtune models download --latest/--release`
is checked as ``SIZE@RELEASE-DATE`` (its ctx_len from the file name; a file of another variant,
RWKV-7a/7b, is named), and a pinned file whose name states another context than the config's
ctx_len fails.

    python examples/test_model_configs.py        # from the repo root

Exit status: 0 if every config is valid and fits its model file, 1 otherwise. This is the same
check as `rwkvtune models check` (rwkvtune.configs.check.check_all), printed in more detail.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Use this checkout's package even when rwkvtune is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkvtune.configs.check import check_all  # noqa: E402
from rwkvtune.configs.model_loader import models_dir  # noqa: E402


def describe(cfg) -> None:
    print(f"  {cfg.model_name}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} "
          f"head_size={cfg.head_size_a} vocab={cfg.vocab_size} ctx_len={cfg.ctx_len} dim_ffn={cfg.dim_ffn}")
    print(f"  low-rank dims: decay(w)={cfg.dim_att_lora} iclr(a)={cfg.dim_aaa_lora} "
          f"value(v)={cfg.dim_mv_lora} gate(g)={cfg.dim_gate_lora}")
    print(f"  params: {cfg.n_params:,} ({cfg.n_params / 1e9:.3g}B)")
    print(f"  recommended: ctx_len={cfg.recommended_ctx_len} batch_size={cfg.recommended_batch_size} "
          f"lr={cfg.recommended_lr:g}")


def main() -> int:
    results, warnings = check_all()
    for w in warnings:
        print(f"WARN {w}")
    print(f"{len(results)} config(s) in reach; models directory: {models_dir()}\n")
    for r in results:
        print(f"[{r.key}] {r.path}" + (f" (shadowed by {r.shadowed_by})" if r.shadowed_by else ""))
        if r.config is None:
            print(f"  FAIL invalid config: {r.detail}\n")
            continue
        describe(r.config)
        if not r.ok:
            print(f"  FAIL model file: {r.detail}\n")
        elif r.compared:
            print(f"  OK, model file fits: {r.config.model_path}\n")
        else:
            print(f"  OK (model file not present: {r.config.model_path or 'none'}; shape check skipped)\n")
    bad = sum(not r.ok for r in results)
    compared = sum(r.compared for r in results)
    print(f"{len(results) - bad}/{len(results)} config(s) OK, {compared} compared with a model file")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
