#!/usr/bin/env python
"""Load and validate every model config in reach and compare each with its model file.

Configs in reach: the package's registry (rwkvtune/configs/models/*.json) plus every *.json in
the directories listed in $RWKVTUNE_CONFIG_PATH. A config whose model file is present (its
model_path: an absolute model_file, or model_file under $RWKVTUNE_MODEL_DIR, default
~/.rwkvtune/models) is compared tensor by tensor with the file's shapes; only the shapes are
read, not the weights.

    python examples/test_model_configs.py        # from the repo root

Exit status: 0 if every config is valid and fits its model file, 1 otherwise.
(`rwkvtune models check` does the same with one line per config.)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Use this checkout's package even when rwkvtune is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkvtune.configs.model_loader import ModelConfig, all_config_files, models_dir  # noqa: E402
from rwkvtune.errors import RwkvtuneError  # noqa: E402


def check_model_file(config: ModelConfig) -> str:
    """'' if the model file fits the config (or is absent), else the problem."""
    from rwkvtune.configs.checkpoint import check_config_against, mismatch_error, read_shapes

    shapes, _, _ = read_shapes(config.model_path)  # the file index only, no weights
    if check_config_against(config, shapes):
        return str(mismatch_error(config, config.model_path, shapes))
    return ""


def main() -> int:
    problems = 0
    checked_files = 0
    entries = all_config_files()
    print(f"{len(entries)} config(s) in reach; models directory: {models_dir()}\n")
    for key, path, shadowed_by in entries:
        print(f"[{key}] {path}" + (f" (shadowed by {shadowed_by})" if shadowed_by else ""))
        try:
            cfg = ModelConfig.from_file(path)
        except RwkvtuneError as e:
            print(f"  FAIL invalid config: {e}\n")
            problems += 1
            continue
        print(f"  {cfg.model_name}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} "
              f"head_size={cfg.head_size_a} vocab={cfg.vocab_size} ctx_len={cfg.ctx_len} dim_ffn={cfg.dim_ffn}")
        print(f"  low-rank dims: decay(w)={cfg.dim_att_lora} iclr(a)={cfg.dim_aaa_lora} "
              f"value(v)={cfg.dim_mv_lora} gate(g)={cfg.dim_gate_lora}")
        print(f"  params: {cfg.n_params:,} ({cfg.n_params / 1e9:.3g}B)")
        print(f"  recommended: ctx_len={cfg.recommended_ctx_len} batch_size={cfg.recommended_batch_size} "
              f"lr={cfg.recommended_lr:g}")
        if cfg.model_path and Path(cfg.model_path).is_file():
            checked_files += 1
            try:
                problem = check_model_file(cfg)
            except RwkvtuneError as e:
                problem = str(e)
            if problem:
                print(f"  FAIL model file: {problem}\n")
                problems += 1
                continue
            print(f"  OK, model file fits: {cfg.model_path}\n")
        else:
            print(f"  OK (model file not present: {cfg.model_path or 'none'}; shape check skipped)\n")
    print(f"{len(entries) - problems}/{len(entries)} config(s) OK, {checked_files} compared with a model file")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
