"""The dry run: resolved setup, parameter counts and a memory estimate, before any training."""

from __future__ import annotations


def dry_run_summary(report: dict) -> str:
    """One line for people (the JSON on stdout is for tools), with a warning when the estimate
    exceeds 90% of the device's memory and what to change."""
    mem, avail = report["memory_estimate_gib"], report["memory_available_gib"]
    line = (f"dry run: {report['model']['name']}, mode {report['config']['mode']}: "
            f"{report['trainable_params']:,} trainable / {report['frozen_params']:,} frozen params, "
            f"{report['total_steps']} step{'s' if report['total_steps'] != 1 else ''} of up to "
            f"{report['tokens_per_step']:,} tokens; memory estimate "
            f"{mem:.1f} GiB" + (f" of {avail:.1f} GiB on {report['device']}" if avail else ""))
    if avail and mem > 0.9 * avail:
        line += ("; too much for this device: lower batch_size (raise grad_accum to keep the effective batch), "
                 "set grad_checkpoint=true, or use mode lora or state")
    return line


def dry_run_report(cfg, model_config, module, tokens_per_step, total_steps, n_windows) -> dict:
    """Resolved config, dims, parameter counts, tokens per step and a memory estimate."""
    from rwkvtune.peft.base import count_params

    trainable, frozen, unused = count_params(module)
    c = model_config
    # fp32 weights + fp32 grads and two AdamW moments for trainable params.
    weights = (trainable + frozen + unused) * 4 + trainable * 12
    # About 67 C-sized vectors per token per layer are kept for backward (measured with saved-
    # tensor hooks on the 0.1B shape at T=512); with checkpointing
    # only each block's input is kept, plus one block's worth during recomputation.
    act_bytes = 2 if cfg.precision == "bf16" else 4
    per_layer = cfg.batch_size * cfg.ctx_len * c.n_embd * act_bytes
    acts = per_layer * (c.n_layer + 67 if cfg.grad_checkpoint else 67 * c.n_layer)
    # logits, log-softmax, their gradient and the L2Wrap buffer: ~4 fp32 tensors of B x T x V
    logits = cfg.batch_size * cfg.ctx_len * c.vocab_size * 4 * 4
    mem = weights + acts + logits
    return {
        "config": cfg.to_dict(),
        "model": {"name": c.model_name, "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                  "head_size_a": c.head_size_a, "dim_att_lora": c.dim_att_lora, "dim_aaa_lora": c.dim_aaa_lora,
                  "dim_mv_lora": c.dim_mv_lora, "dim_gate_lora": c.dim_gate_lora, "dim_ffn": c.dim_ffn},
        "trainable_params": trainable,
        "frozen_params": frozen,
        "unused_params": unused,  # layer 0's v0/v1/v2: stored, never used by the forward
        "tokens_per_step": tokens_per_step,
        "total_steps": total_steps,
        "train_windows": n_windows,
        "memory_estimate_gib": round(mem / 2 ** 30, 2),
    }
