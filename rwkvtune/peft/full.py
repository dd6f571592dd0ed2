"""Full fine-tuning (and pretraining): every weight of the model is trained."""

from __future__ import annotations

import torch

from rwkvtune.peft.base import Mode


class FullMode(Mode):
    name = "full"
    trains_base = True

    def conflicts(self, cfg) -> list[tuple[dict[str, str], str]]:
        out = super().conflicts(cfg)
        if getattr(cfg, "base_quant", "none") != "none":
            out.append(({"base_quant": repr(cfg.base_quant), "mode": repr(cfg.mode)},
                        "a full fine-tune updates every weight, and a quantized base is frozen; use mode lora or "
                        "state, or base_quant none"))
        return out

    def prepare(self, model, cfg) -> None:
        return None  # every weight stays trainable

    def save_outputs(self, run, module, cfg) -> dict[str, str]:
        dtype = torch.bfloat16 if cfg.save_dtype == "bf16" else torch.float32
        module.model.save_checkpoint(run.final, dtype=dtype)
        return {"final": str(run.final)}
