"""Preference-optimisation maths (DPO, IPO, SimPO): pure functions on per-sequence log-probabilities.

Reference: TRL v1.9.0, ``trl/trainer/dpo_trainer.py`` (``sigmoid``, ``ipo``, the logged metrics)
and ``trl/experimental/cpo/cpo_trainer.py`` (``simpo``); ``sigmoid`` with label smoothing is the
conservative DPO of TRL <= 0.28 (see :func:`dpo_loss`). Notation, per preference pair:

* ``pi_c``, ``pi_r``: the policy's summed log-probabilities of the chosen / rejected completion;
* ``ref_c``, ``ref_r``: the same under the frozen reference model;
* ``n_c``, ``n_r``: the number of scored completion tokens.

Log-probabilities are summed over completion tokens only (labels -100 elsewhere), in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rwkvtune.constants import IGNORE_INDEX
from rwkvtune.data.preference import PreferenceDataset, collate_pairs, read_pairs
from rwkvtune.errors import ConfigError
from rwkvtune.io.safetensors_io import load_safetensors, save_safetensors
from rwkvtune.models.rwkv7.method_config import DPO_LOSS_TYPES, DPOConfig
from rwkvtune.train.methods.base import BatchCount, MetricSums, TrainingMethod
from rwkvtune.train.methods.reference import Reference, reference_problems
from rwkvtune.train.runtime import all_sum_tensor

LOSS_TYPES = DPO_LOSS_TYPES


class PreferenceLoss(NamedTuple):
    """Per-pair results [P] of :func:`dpo_loss`.

    ``losses`` keeps its graph; ``chosen_rewards``/``rejected_rewards`` (detached) are the implicit
    rewards TRL logs; ``chosen_logps``/``rejected_logps`` (detached) are the policy log-probs TRL
    logs as ``logps/*``: summed for sigmoid and ipo (DPOTrainer), per-token means for simpo
    (CPOTrainer computes and logs length-normalised log-probs for it).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probabilities of ``labels`` under ``logits``, and token counts.

    ``logits`` [B, T, V] (any float dtype, computed in fp32), ``labels`` [B, T]: already the next
    tokens (this project's datasets shift them), position t scored against ``labels[t]``; IGNORE_INDEX
    marks positions that are not scored (the prompt, padding). Returns ``(sum_logps [B] fp32,
    n_tokens [B] int64)``. log p = logit[label] - logsumexp(logits), which never builds the full
    [B, T, V] log-softmax (only the fp32 upcast of bf16 logits, as the cross-entropy does).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(f"sequence_logps: expected logits [B, T, V] and labels [B, T], found logits "
                          f"{list(logits.shape)} and labels {list(labels.shape)}; pass one batch's logits and labels")
    x = logits.float()
    scored = labels != IGNORE_INDEX
    picked = x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]; -100 -> any token, masked below
    token_logps = (picked - torch.logsumexp(x, dim=-1)) * scored
    return token_logps.sum(-1), scored.sum(-1)


def _check_options(loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float) -> None:
    """The rules of a dpo run's options (DPOConfig's: one set, the config's and this function's)."""
    problems = DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         simpo_gamma=simpo_gamma).problems()
    if problems:
        raise ConfigError(f"dpo {problems[0]}; pass values that a dpo run's config accepts")


def _need(name: str, loss_type: str, value):
    if value is None:
        raise ConfigError(f"dpo_loss: loss_type {loss_type!r} needs {name}, found None; pass it (sequence_logps "
                          f"gives log-probs and token counts)")
    return value


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z): the preference is right with
    probability 1 - eps (conservative DPO); eps = 0 is plain -log sigmoid(z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_n_tokens: torch.Tensor | None = None, rejected_n_tokens: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> PreferenceLoss:
    """Per-pair preference losses and implicit rewards; all inputs [P] (summed log-probs, counts).

    * ``sigmoid`` (DPO): h = (pi_c - ref_c) - (pi_r - ref_r);
      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = ``label_smoothing``.
      TRL <= 0.28 computed exactly this; TRL >= 0.29 dropped eps from ``sigmoid`` (it only feeds
      ``robust``/``exo_pair``/``aot`` there), so with eps = 0 this equals every TRL version.
      Rewards: beta (pi_c - ref_c), beta (pi_r - ref_r).
    * ``ipo``: as TRL, on per-token means of the log-ratios (TRL's length normalisation, which the
      IPO authors confirmed): h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r;
      loss = (h - 1 / (2 beta))^2 (beta is the paper's tau). Rewards as sigmoid (summed
      log-ratios, what TRL's DPOTrainer logs). Needs the token counts.
    * ``simpo`` (reference-free; TRL CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``):
      h = pi_c / n_c - pi_r / n_r - gamma / beta; loss as sigmoid's with beta h (label smoothing
      included, as CPOTrainer). Rewards: beta pi_c / n_c, beta pi_r / n_r. The reference log-probs
      are not used (may be None). CPOTrainer's optional NLL term (``cpo_alpha``) is not here.

    Token counts below 1 count as 1 (a pair with an empty completion does not divide by zero).
    """
    _check_options(loss_type, beta, label_smoothing, simpo_gamma)
    pi_c, pi_r = policy_chosen_logps, policy_rejected_logps
    if loss_type == "simpo":
        n_c = _need("chosen_n_tokens", loss_type, chosen_n_tokens).to(pi_c.dtype).clamp(min=1.0)
        n_r = _need("rejected_n_tokens", loss_type, rejected_n_tokens).to(pi_r.dtype).clamp(min=1.0)
        avg_c, avg_r = pi_c / n_c, pi_r / n_r
        # gamma / beta inside, times beta outside: the margin gamma is in units of beta * logp
        losses = _smoothed_sigmoid_loss(beta * (avg_c - avg_r - simpo_gamma / beta), label_smoothing)
        return PreferenceLoss(losses, (beta * avg_c).detach(), (beta * avg_r).detach(), avg_c.detach(),
                              avg_r.detach())
    ratio_c = pi_c - _need("ref_chosen_logps", loss_type, ref_chosen_logps)
    ratio_r = pi_r - _need("ref_rejected_logps", loss_type, ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * (ratio_c - ratio_r), label_smoothing)
    else:  # ipo
        n_c = _need("chosen_n_tokens", loss_type, chosen_n_tokens).to(pi_c.dtype).clamp(min=1.0)
        n_r = _need("rejected_n_tokens", loss_type, rejected_n_tokens).to(pi_r.dtype).clamp(min=1.0)
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, (beta * ratio_c).detach(), (beta * ratio_r).detach(), pi_c.detach(),
                          pi_r.detach())


def preference_sums(result: PreferenceLoss) -> dict[str, float]:
    """TRL's logged preference metrics as sums over the pairs of ``result`` (divide by the number of
    pairs for the means TRL logs; sums add up over micro-batches and processes):

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen - rejected),
    ``rewards/accuracies`` (pairs with chosen reward strictly above rejected: a tie counts as
    wrong, as TRL's ``>``), ``logps/chosen``, ``logps/rejected``.
    """
    c, r = result.chosen_rewards.float(), result.rejected_rewards.float()
    return {
        "rewards/chosen": float(c.sum()),
        "rewards/rejected": float(r.sum()),
        "rewards/margins": float((c - r).sum()),
        "rewards/accuracies": float((c > r).float().sum()),
        "logps/chosen": float(result.chosen_logps.float().sum()),
        "logps/rejected": float(result.rejected_logps.float().sum()),
    }


def preference_metrics(result: PreferenceLoss) -> dict[str, float]:
    """The means of :func:`preference_sums` over the pairs of ``result`` (what TRL logs)."""
    n = max(1, result.chosen_rewards.numel())
    return {k: v / n for k, v in preference_sums(result).items()}


# ---- the training method ------------------------------------------------------------------------
class DPO(TrainingMethod):
    """``--method dpo``: preference optimisation on ``{"prompt", "chosen", "rejected"}`` pairs.

    A batch is B pairs run as 2B sequences (chosen, then rejected); a loss unit is a pair. The
    reference log-probabilities come from, in this order of preference:

    * ``loss_type: simpo``: none (reference-free);
    * ``precompute_ref: true``: computed once before the first step with the starting model
      (lora/state modes: the base, every trained part off) and cached in the run directory
      (``ref_logps.safetensors``), so the reference never sits in memory during training;
    * otherwise :class:`~rwkvtune.train.methods.reference.Reference`: lora and state modes the same
      module with its trained parts switched off (the exact base, no second copy); full mode a
      frozen copy of the starting model (not under ``strategy: fsdp``: use ``precompute_ref`` there).
    """

    name = "dpo"
    item_name = "pairs"
    token_units = False  # a loss unit is a pair; the logged token count is the tokens processed

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reference = Reference()
        self.ref_cache: dict[str, torch.Tensor] = {}  # precompute_ref: split -> [N, 2] (chosen, rejected)

    # -- configuration
    @classmethod
    def problems(cls, cfg) -> list[str]:
        # The options' own rules (beta > 0, loss_type, label_smoothing with ipo) are DPOConfig's,
        # checked by TrainConfig.validate; what is left depends on the mode and strategy.
        return reference_problems(cfg, "method dpo") if cfg.dpo.loss_type != "simpo" else []

    # -- data
    def build_datasets(self, tokenizer, vocab_size: int):
        return self.splits(lambda path: PreferenceDataset(read_pairs(path, tokenizer, self.cfg.on_data_error,
                                                                     vocab_size)[0]))

    def collate(self, items: list, device) -> dict:
        return collate_pairs(items, device)

    def count(self, batch: dict) -> BatchCount:
        return BatchCount(units=float(batch["input_ids"].shape[0] // 2), tokens=float(batch["input_ids"].numel()))

    def memory_shape(self, dataset) -> tuple[int, int]:
        # chosen and rejected run together, each whole (one graph through every ctx_len chunk)
        return 2, max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in dataset.pairs)

    def keeps_reference_copy(self, mode) -> bool:
        return mode.trains_base and self.opts.loss_type != "simpo" and not self.opts.precompute_ref

    # -- the reference
    def setup(self, r) -> None:
        """Prepare the reference before the first step (see the class docstring)."""
        if self.opts.loss_type == "simpo":
            return
        if self.opts.precompute_ref:
            self._precompute(r)
        else:
            self.reference.setup(r)

    def _nll(self, module, ids, labels, ctx, via=None) -> torch.Tensor:
        """Summed negative log-likelihood of every sequence's scored tokens [2B], run in ctx_len
        chunks that carry the RNN state (one graph through all chunks: the loss needs the total).
        ``via``: the wrapped module to call (DDP), see TrainModule."""
        state, total = None, 0.0
        for s in range(0, ids.shape[1], self.cfg.ctx_len):
            with ctx.autocast():
                nll, state = module.sequence_nll(ids[:, s:s + self.cfg.ctx_len], labels[:, s:s + self.cfg.ctx_len],
                                                 state, via=via)
            total = total + nll
        return total

    @torch.no_grad()
    def _reference(self, module, batch: dict, ctx, split: str) -> torch.Tensor | None:
        """Reference log-probs [2B] (chosen, then rejected), or None for simpo."""
        if self.opts.loss_type == "simpo":
            return None
        if split in self.ref_cache:
            rows = self.ref_cache[split][batch["index"]]  # [B, 2]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        with self.reference.active(module, ctx.mode) as ref:
            return -self._nll(ref, batch["input_ids"], batch["labels"], ctx)

    def _precompute(self, r) -> None:
        """Reference log-probs of every pair, once, cached in the run directory; a resumed run reads
        them back (its model has moved on since)."""
        path = r.run.ref_logps
        if path.is_file():
            self.ref_cache = {k: v.clone() for k, v in load_safetensors(path, mmap_file=False).items()}
            return
        ctx = r.context()
        for split, dataset in (("train", r.train_set), ("eval", r.eval_set)):
            if dataset is None:
                continue
            table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=r.device)
            mine = list(range(r.dist.rank, len(dataset), r.dist.world_size))  # each process its share
            for start in range(0, len(mine), self.cfg.batch_size):
                batch = self.collate([dataset[i] for i in mine[start:start + self.cfg.batch_size]], r.device)
                logps = self._reference(r.module, batch, ctx, split="none").double()
                B = logps.shape[0] // 2
                table[batch["index"].to(r.device)] = torch.stack([logps[:B], logps[B:]], 1)
            self.ref_cache[split] = all_sum_tensor(table, r.dist).float().cpu()
        if r.dist.main:
            save_safetensors(self.ref_cache, path, metadata={"format": "rwkvtune-dpo-ref-logps"})

    # -- the loss
    def _loss(self, module, batch, ctx, split, policy_nll) -> tuple[torch.Tensor, dict]:
        labels = batch["labels"]
        n = (labels != IGNORE_INDEX).sum(-1)
        B = labels.shape[0] // 2
        logps = -policy_nll
        ref = self._reference(module, batch, ctx, split)
        result = dpo_loss(logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
                          self.opts.beta, self.opts.loss_type, self.opts.label_smoothing, chosen_n_tokens=n[:B],
                          rejected_n_tokens=n[B:], simpo_gamma=self.opts.simpo_gamma)
        loss = result.losses.sum()
        # Beside TRL's metrics: pairs whose chosen completion the policy alone finds more likely per
        # token (no reference): chance for an untrained model, whatever the reward accuracy says.
        per_token = logps.detach() / n.clamp(min=1)
        mine = float((per_token[:B] > per_token[B:]).float().sum())
        return loss, {"loss": float(loss.detach()), **preference_sums(result), "policy_accuracy": mine}

    def forward_backward(self, module, batch: dict, ctx) -> MetricSums:
        with ctx.sync_context(ctx.sync):
            nll = self._nll(module, batch["input_ids"], batch["labels"], ctx, via=ctx.runner)
            loss, sums = self._loss(module, batch, ctx, "train", nll)
            (loss * ctx.scale).backward()
        return MetricSums(sums)  # every value a mean per pair

    @torch.no_grad()
    def evaluate(self, module, dataset, ctx) -> dict:
        """The same metrics over every held-out pair, as TRL names them (``eval_rewards/accuracies``)."""
        was_training = module.training
        module.eval()
        totals: dict[str, float] = {}
        bs = self.cfg.batch_size
        for start in range(0, len(dataset), bs):
            ctx.tick("eval batch", start // bs, -(-len(dataset) // bs))
            batch = self.collate([dataset[i] for i in range(start, min(len(dataset), start + bs))], ctx.device)
            _, sums = self._loss(module, batch, ctx, "eval", self._nll(module, batch["input_ids"], batch["labels"], ctx))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
        module.train(was_training)
        return {f"eval_{k}": v / len(dataset) for k, v in totals.items()} | {"eval_pairs": len(dataset)}
