"""``sft``: the language-model objective (pretraining, supervised fine-tuning, long context).

Loss: next-token cross-entropy summed over target tokens (labels != IGNORE_INDEX), plus the reference
trainer's L2Wrap; the trainer divides by the target count of the whole global batch.

Samples longer than ctx_len (``long_context``) run in ctx_len chunks carrying the RNN state:
truncated BPTT runs backward per chunk (memory bounded by ctx_len); ``bptt=full`` keeps one graph
through every chunk.

Packed batches (``packing``) carry ``doc_start``: each document restarts from the initial state
at its first token, also inside a chunk and across chunks (a document spanning chunks carries
the state as a whole sample does), so a packed batch's losses and gradients are those of its
documents run one by one.
"""

from __future__ import annotations

import math

import torch

from rwkvtune.constants import IGNORE_INDEX
from rwkvtune.train.data import build_dataset, collate
from rwkvtune.train.methods.base import BatchCount, MetricSums, StepContext, TrainingMethod

L2WRAP = 1e-4  # the reference trainer's L2Wrap coefficient


class SFT(TrainingMethod):
    name = "sft"

    def build_datasets(self, tokenizer, vocab_size: int):
        return self.splits(lambda path: build_dataset(path, tokenizer, self.cfg, vocab_size))

    def collate(self, items: list, device) -> dict:
        return collate(items, device)

    def count(self, batch: dict) -> BatchCount:
        return BatchCount(units=float(int((batch["labels"] != IGNORE_INDEX).sum())),
                          tokens=float(batch["input_ids"].numel()))

    def forward_backward(self, module, batch: dict, ctx: StepContext) -> MetricSums:
        cfg = ctx.cfg
        idx, labels, starts = batch["input_ids"], batch["labels"], batch.get("doc_start")
        T = idx.shape[1]
        chunks = [(s, min(T, s + cfg.ctx_len)) for s in range(0, T, cfg.ctx_len)]
        # L2Wrap's per-token coefficient: the 1/(loss units) reaches it through the scaled loss.
        l2 = L2WRAP if cfg.l2wrap else 0.0
        state, total, graph_loss = None, 0.0, None
        for ci, (s, e) in enumerate(chunks):
            last = ci == len(chunks) - 1
            with ctx.sync_context(ctx.sync and (last or cfg.bptt == "full")):
                with ctx.autocast():
                    loss, state = module.loss_sum(idx[:, s:e], labels[:, s:e], state, l2wrap=l2, via=ctx.runner,
                                                  doc_start=None if starts is None else starts[:, s:e])
                if not loss.requires_grad:
                    # State tuning under truncated BPTT: only the first chunk reaches the initial
                    # state. A zero term keeps backward (and DDP's gradient sync) well defined.
                    loss = loss + sum(0.0 * p.sum() for p in module.parameters() if p.requires_grad)
                total += float(loss.detach())
                if cfg.bptt == "full":
                    graph_loss = loss if graph_loss is None else graph_loss + loss
                else:
                    (loss * ctx.scale).backward()
                    state = state.detach()
            if len(chunks) > 1:
                ctx.tick("chunk", ci + 1, len(chunks))
        if graph_loss is not None:
            with ctx.sync_context(ctx.sync):
                (graph_loss * ctx.scale).backward()
        return MetricSums({"loss": total})

    @torch.no_grad()
    def evaluate(self, module, dataset, ctx: StepContext) -> dict:
        """Token-weighted loss and perplexity over every window of ``dataset`` (in order)."""
        cfg = ctx.cfg
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        bs = cfg.batch_size
        batches = -(-len(dataset) // bs)
        for start in range(0, len(dataset), bs):
            ctx.tick("eval batch", start // bs, batches)
            batch = collate([dataset[i] for i in range(start, min(len(dataset), start + bs))], ctx.device)
            idx, labels, starts = batch["input_ids"], batch["labels"], batch.get("doc_start")
            state = None
            for s in range(0, idx.shape[1], cfg.ctx_len):
                part = {} if starts is None else {"doc_start": starts[:, s:s + cfg.ctx_len]}
                with ctx.autocast():
                    loss, state = module.loss_sum(idx[:, s:s + cfg.ctx_len], labels[:, s:s + cfg.ctx_len], state,
                                                  **part)
                total += float(loss)
            count += int((labels != IGNORE_INDEX).sum())
        module.train(was_training)
        loss = total / max(1, count)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
