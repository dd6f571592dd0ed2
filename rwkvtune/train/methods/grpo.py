"""``--method grpo``: group relative policy optimisation with batched RNN rollouts.

The maths (advantages, the clipped objective, TRL's formulas) is in :mod:`rwkvtune.train.policy_loss`;
the reward functions in :mod:`rwkvtune.train.rewards`.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from rwkvtune.constants import END_OF_TEXT, IGNORE_INDEX
from rwkvtune.data.collate import right_pad
from rwkvtune.data.prompts import PromptDataset, read_prompts
from rwkvtune.errors import CheckpointError, DataError
from rwkvtune.generate.batch import generate_batch
from rwkvtune.train.methods.base import BatchCount, MetricSums, TrainingMethod
from rwkvtune.train.methods.reference import Reference, reference_problems
from rwkvtune.train.progress import write
from rwkvtune.train.policy_loss import (  # noqa: F401  (re-exported: the maths under the method's name)
    LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    grpo_loss,
    reward_metrics,
    token_logps,
)
from rwkvtune.train.reward_worker import start_rewards
from rwkvtune.train.rewards import compute_rewards, parse_rewards, reserved_field_problem
from rwkvtune.train.rewards import REWARD_LIMIT

class _Policy:
    """The training module as :func:`rwkvtune.generate.generate_batch` calls a model: every call
    goes through the module's own forward, so its adapters and its tuned initial state apply as in
    training (a sharded module is gathered first: see :meth:`Strategy.decoding`)."""

    def __init__(self, module):
        self.module, self.config = module, module.model.config

    def parameters(self):
        return self.module.parameters()

    def __call__(self, idx, state=None, return_state=False, wkv_init=None, last_only=False):
        logits, state = self.module.logits(idx, state, last_only=last_only)
        return (logits, state) if return_state else logits


class GRPO(TrainingMethod):
    """``--method grpo``: group relative policy optimisation on ``{"prompt", ...}`` records.

    Every ``num_iterations`` optimizer steps, each process samples ``num_generations`` (G)
    completions for each of its prompts with batched RNN decoding (each prompt prefilled once, its
    state copied G times), scores them with the reward functions and turns the rewards into
    group-relative advantages; the next ``num_iterations`` steps update the policy on those
    rollouts (the old log-probs, and the reference's when ``beta`` > 0, computed once after
    sampling). A loss unit is a completion token (``loss_type`` dapo) or a completion (grpo,
    dr_grpo). Every rollout with its rewards is appended to ``rollouts.jsonl`` in the run.
    """

    name = "grpo"
    item_name = "prompts"
    token_units = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rewards = parse_rewards(cfg.grpo.reward) if cfg.grpo.reward else []
        # Every reward runs in a worker process, started now so that a reward file that fails (or
        # hangs) at import stops the run before the model loads; closed by close().
        self.worker = start_rewards(self.rewards, cfg.grpo.reward_timeout) if self.rewards else None
        self.warned: set[str] = set()  # reward functions whose invalid values were reported
        self.reference = Reference()
        self.buffer: list[dict] = []  # rollout micro-batches of the current batch of prompts
        self.tokenizer = None
        self.run = None

    @classmethod
    def problems(cls, cfg) -> list[str]:
        # The options' own rules (reward, bounds, epsilon_high >= epsilon, ...) are GRPOConfig's,
        # checked by TrainConfig.validate; what is left depends on the mode and strategy.
        return reference_problems(cfg, "method grpo with beta > 0") if cfg.grpo.beta else []

    @property
    def steps_per_batch(self) -> int:
        return self.opts.num_iterations

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    # -- data
    def build_datasets(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

        def read(path):
            dataset = PromptDataset(read_prompts(path, tokenizer, self.cfg.on_data_error, vocab_size)[0])
            problem = reserved_field_problem(dataset.records[0].fields, path)  # every record has the same fields
            if problem:
                raise DataError(problem)
            return dataset

        return self.splits(read)

    def collate(self, items: list, device) -> dict:
        return {"records": [it["record"] for it in items], "index": torch.tensor([it["index"] for it in items])}

    def count(self, batch: dict) -> BatchCount:
        mask = batch["labels"] != IGNORE_INDEX
        units = mask.sum() if self.opts.loss_type == "dapo" else mask.shape[0]
        return BatchCount(units=float(units), tokens=float(batch["input_ids"].numel()))

    def memory_shape(self, dataset) -> tuple[int, int]:
        # a prompt's G completions train together, each prompt + completion in one graph
        return self.opts.num_generations, max(len(r.ids) for r in dataset.records) + self.opts.max_completion_length

    def keeps_reference_copy(self, mode) -> bool:
        return mode.trains_base and self.opts.beta != 0

    def setup(self, r) -> None:
        self.run = r
        if self.opts.beta != 0:
            self.reference.setup(r)

    # -- rollouts
    def begin_step(self, module, micro_batches: list[dict], ctx) -> list[dict]:
        """Fresh prompts (every num_iterations steps): sample and score; else the stored rollouts."""
        if micro_batches:
            self.buffer = self._sample(module, micro_batches, ctx)
        elif not self.buffer:  # load_state_dict checks the stored rollouts; none inside a batch is a bug
            raise RuntimeError(f"step {ctx.step} reuses the rollouts of its batch, but none are stored")
        else:  # rollouts restored from a checkpoint are read to the CPU
            self.buffer = [{k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                           for b in self.buffer]
        return self.buffer

    def _generate(self, module, records, G: int, greedy: bool = False, tick=None):
        """G completions per record, decoded together; returns (completions, seconds). ``tick``:
        a StepContext's, told each decoded position (a long rollout shows progress)."""
        cfg = self.cfg
        sampling = dict(temperature=0.0) if greedy else dict(temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p)
        was_training = module.training
        module.eval()  # no dropout while sampling
        t0 = time.perf_counter()
        run = getattr(self, "run", None)  # set by setup(); absent when a test calls this alone
        decoding = run.strategy.decoding(module) if run is not None else contextlib.nullcontext()
        try:
            with decoding:
                out = generate_batch(_Policy(module), self.tokenizer, [r.ids.tolist() for r in records],
                                     samples_per_prompt=G, max_tokens=cfg.grpo.max_completion_length, top_k=0,
                                     presence_penalty=0.0, frequency_penalty=0.0, stop=tuple(cfg.grpo.stop),
                                     on_token=(lambda t, n: tick("rollout token", t, n)) if tick else None, **sampling)
        finally:
            module.train(was_training)
        return out, time.perf_counter() - t0

    def _score(self, records, completions) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [records[c.prompt_index].text for c in completions]
        fields = {k: [records[c.prompt_index].fields[k] for c in completions] for k in records[0].fields}
        weights = list(self.opts.reward_weights) or [1.0] * len(self.rewards)
        total, per_fn = compute_rewards(self.rewards, weights, prompts, [c.text for c in completions], fields)
        self._warn_invalid(per_fn)
        return total, per_fn

    def _warn_invalid(self, per_fn: torch.Tensor) -> None:
        """Once per function: its first invalid values (NaN in per_fn), on stderr."""

        for j, func in enumerate(self.rewards):
            bad = int(per_fn[:, j].isnan().sum())
            if bad and func.name not in self.warned:
                self.warned.add(func.name)
                write(f"warning: {func.describe()} returned {bad} of {per_fn.shape[0]} values that are NaN, +-inf or "
                      f"beyond +-{REWARD_LIMIT:g}; they count 0 in the total, and rewards/{func.name}/invalid_frac "
                      f"counts them (said once per function)")

    def _sample(self, module, micro_batches: list[dict], ctx) -> list[dict]:
        """Rollouts for every prompt of this step's micro-batches, as one rollout micro-batch each."""
        cfg, G = self.cfg, self.opts.num_generations
        records = [rec for b in micro_batches for rec in b["records"]]
        completions, seconds = self._generate(module, records, G, tick=ctx.tick)
        total, per_fn = self._score(records, completions)
        advantages = _advantages(total, G, cfg.grpo.scale_rewards, self.run)
        out, start = [], 0
        for k, b in enumerate(micro_batches):
            rows = slice(start * G, (start + len(b["records"])) * G)
            start += len(b["records"])
            batch = _sequences(records, completions[rows], ctx.device)
            batch["advantages"] = advantages[rows].to(ctx.device)
            if cfg.grpo.num_iterations > 1 or self.opts.beta != 0:
                ctx.tick("log-prob pass", k, len(micro_batches))
            with torch.no_grad():
                if cfg.grpo.num_iterations > 1:  # the policy that sampled, before any update on these rollouts
                    batch["old_logps"] = -_token_nll(module, batch, ctx, cfg)
                if self.opts.beta != 0:
                    with self.reference.active(module, ctx.mode) as ref:
                        batch["ref_logps"] = -_token_nll(ref, batch, ctx, cfg)
            out.append(batch)
        out[0]["rollout_sums"] = _rollout_sums(total, per_fn, [f.name for f in self.rewards], completions, G,
                                               cfg.grpo.scale_rewards, seconds)
        self._log_rollouts(ctx.step, records, completions, total, per_fn, advantages)
        return out

    def _log_rollouts(self, step, records, completions, total, per_fn, advantages) -> None:
        """Every rollout with its rewards, appended to the run's rollouts.jsonl (gathered from every
        process by the main one)."""
        if self.run is None:
            return
        names = [f.name for f in self.rewards]
        rows = [{"step": step, "prompt": records[c.prompt_index].text, "completion": c.text,
                 "finish_reason": c.finish_reason, "reward": float(total[i]), "advantage": float(advantages[i]),
                 # an invalid value (NaN) is written as null: JSON has no NaN
                 "rewards": {n: _finite_or_none(float(per_fn[i, j])) for j, n in enumerate(names)}}
                for i, c in enumerate(completions)]
        if self.run.dist.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * self.run.dist.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if self.run.dist.main:
            self.run.logger.log_rollouts(rows)

    def _evaluate(self, module, dataset, ctx) -> dict:
        """Greedy completions (one per held-out prompt) scored by the reward functions: the mean
        total reward (``eval_reward``), each function's mean, and the completion length."""
        records = [dataset[i]["record"] for i in range(len(dataset))]
        completions, _ = self._generate(module, records, 1, greedy=True, tick=ctx.tick)
        total, per_fn = self._score(records, completions)
        out = {"eval_reward": float(total.mean())}
        out.update({f"eval_rewards/{f.name}/mean": float(per_fn[:, j].nanmean()) for j, f in enumerate(self.rewards)})
        out.update({f"eval_rewards/{f.name}/invalid_frac": float(per_fn[:, j].isnan().float().mean())
                    for j, f in enumerate(self.rewards)})
        out["eval_completion_length"] = sum(len(c.token_ids) for c in completions) / len(completions)
        out["eval_prompts"] = len(records)
        return out

    def forward_backward(self, module, batch: dict, ctx) -> GRPOMetrics:
        with ctx.sync_context(ctx.sync):
            logps = -_token_nll(module, batch, ctx, self.cfg, via=ctx.runner)
            mask = batch["labels"] != IGNORE_INDEX
            B = mask.shape[0]
            o = self.opts
            loss, metrics = grpo_loss(logps=logps, old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"),
                                      advantages=batch["advantages"], mask=mask, epsilon=o.epsilon,
                                      epsilon_high=o.epsilon_high, beta=o.beta, loss_type=o.loss_type,
                                      max_completion_length=o.max_completion_length, num_items_in_batch=1.0)
            # The trainer divides by the loss units of the whole global batch: hand it a sum.
            loss_sum = loss if self.opts.loss_type == "dapo" else loss * B
            (loss_sum * ctx.scale).backward()
        n_tok = float(mask.sum())
        out = GRPOMetrics({"loss": float(loss_sum.detach())}, {"tokens": n_tok, "completions": float(B)})
        out.sums.update({k: metrics[k] * n_tok for k in GRPOMetrics.TOKEN_MEANS if k in metrics})
        if "rollout_sums" in batch:  # the first micro-batch of a step that sampled
            out.add(_rollout_metrics(batch["rollout_sums"]))
        return out

    def new_metrics(self) -> GRPOMetrics:
        return GRPOMetrics()

    @torch.no_grad()
    def evaluate(self, module, dataset, ctx) -> dict:
        return self._evaluate(module, dataset, ctx)

    def state_dict(self) -> dict:
        # Rollouts still to be used by later steps of this batch (num_iterations > 1) must survive a
        # kill: a resumed run continues with the same rollouts, as the uninterrupted one.
        return {"buffer": self.buffer} if self.opts.num_iterations > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        """The stored rollouts, checked: read from a file, they must be what :meth:`_sample` makes."""
        buffer = state.get("buffer", []) if isinstance(state, dict) else None
        problem = _buffer_problem(buffer, self.cfg, self.opts.beta, getattr(self, "vocab_size", None))
        if problem:
            raise CheckpointError(f"stored GRPO rollouts (method state): {problem}; the file is damaged or was not "
                                  f"written by rwkvtune train: move this checkpoint away to resume from the one "
                                  f"before it")
        self.buffer = list(buffer)



# ---- rollouts as training batches -----------------------------------------------------------------
def _sequences(records, completions, device) -> dict:
    """Rows ``[0] + prompt + completion`` (right-padded) with labels on the completion's tokens."""
    seqs = []
    for c in completions:
        prompt = records[c.prompt_index].ids.tolist()
        w = [END_OF_TEXT] + prompt + list(c.token_ids)
        labels = [IGNORE_INDEX] * len(prompt) + list(c.token_ids)
        seqs.append((w[:-1], labels))
    return right_pad(seqs, device)


def _token_nll(module, batch: dict, ctx, cfg, via=None) -> torch.Tensor:
    """Negative log-likelihood [R, T] of every completion token at the sampling temperature, run in
    ctx_len chunks carrying the RNN state (one graph through all of them)."""
    ids, labels = batch["input_ids"], batch["labels"]
    state, parts = None, []
    for s in range(0, ids.shape[1], cfg.ctx_len):
        with ctx.autocast():
            nll, state = module.token_nll(ids[:, s:s + cfg.ctx_len], labels[:, s:s + cfg.ctx_len], state,
                                          temperature=cfg.grpo.temperature, via=via)
        parts.append(nll)
    return torch.cat(parts, 1)


def _advantages(total: torch.Tensor, G: int, scale_rewards: str, run) -> torch.Tensor:
    """Group-relative advantages; with ``batch`` scaling the std is over every process's rewards."""
    if scale_rewards != "batch" or run is None or run.dist.world_size == 1:
        return group_advantages(total, G, scale_rewards)
    import torch.distributed as dist

    parts = [torch.zeros_like(total) for _ in range(run.dist.world_size)]
    dist.all_gather(parts, total.contiguous())
    everyone = torch.cat(parts)
    centred = (total.view(-1, G) - total.view(-1, G).mean(1, keepdim=True)).view(-1)
    return centred / (everyone.std() + 1e-4)


class GRPOMetrics(MetricSums):
    """GRPO's metric sums and what each logged value is a mean over (TRL's names):

    * ``loss``: per loss unit of the row (completion tokens for dapo, completions otherwise);
    * ``kl``, ``clip_ratio/*_mean``: token means, weighted by the count ``tokens`` (completion
      tokens trained on, on every step);
    * per batch of rollouts (the steps that sample, every num_iterations): ``reward``,
      ``frac_reward_zero_std``, ``completion_length`` and ``rewards/NAME/invalid_frac`` per sampled
      completion (count ``rollout_completions``), ``reward_std`` per group (``rollout_groups``),
      ``rewards/NAME/mean`` per valid value of that function (``valid/NAME``), and
      ``rollout_tokens_per_s``: completion tokens per second of sampling (``rollout_seconds``).
    """

    TOKEN_MEANS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    PER_COMPLETION = ("reward", "frac_reward_zero_std", "completion_length")

    def rows(self, units: float) -> dict[str, float | None]:
        s, c = self.sums, self.counts
        out = {"loss": s.get("loss", 0.0) / units if units else None}
        tokens = max(c.get("tokens", 0.0), 1.0)
        out.update({k: s[k] / tokens for k in self.TOKEN_MEANS if k in s})
        n = c.get("rollout_completions", 0.0)
        if n:  # steps that sampled
            out.update({k: s[k] / n for k in self.PER_COMPLETION if k in s})
            out["reward_std"] = s["reward_std"] / max(c.get("rollout_groups", 0.0), 1.0)
            for name in [k[len("rewards/"):-len("/mean")] for k in s if k.startswith("rewards/") and
                         k.endswith("/mean")]:
                valid = c.get(f"valid/{name}", n)  # absent in rollouts stored by an older version
                out[f"rewards/{name}/mean"] = s[f"rewards/{name}/mean"] / valid if valid else None
                out[f"rewards/{name}/invalid_frac"] = s.get(f"rewards/{name}/invalid_frac", 0.0) / n
            out["rollout_tokens_per_s"] = s["completion_length"] / max(c.get("rollout_seconds", 0.0), 1e-9)
        return out


def _rollout_sums(total, per_fn, names, completions, G: int, scale_rewards: str, seconds: float) -> dict:
    """Sums (over completions or groups) of what TRL logs per batch of rollouts, and their counts
    (see GRPOMetrics), as plain data: they travel with the stored rollouts into a checkpoint."""
    grouped = total.view(-1, G)
    sums = {"reward": float(total.sum()), "reward_std": float(grouped.std(1).sum()) if G > 1 else 0.0,
            "frac_reward_zero_std": float(reward_metrics(total, G, scale_rewards)["frac_reward_zero_std"]
                                          * total.numel()),
            "completion_length": float(sum(len(c.token_ids) for c in completions))}
    counts = {"rollout_completions": float(total.numel()), "rollout_groups": float(grouped.shape[0]),
              "rollout_seconds": seconds}
    for j, name in enumerate(names):  # invalid values (NaN) are out of the mean, and counted
        sums[f"rewards/{name}/mean"] = float(per_fn[:, j].nansum())
        counts[f"valid/{name}"] = float((~per_fn[:, j].isnan()).sum())
        sums[f"rewards/{name}/invalid_frac"] = float(per_fn[:, j].isnan().sum())
    return {"sums": sums, "counts": counts}


# The counts of rollouts stored by an older version (one flat mapping, counts marked "_r_").
_OLD_COUNTS = {"_r_completions": "rollout_completions", "_r_groups": "rollout_groups", "_r_seconds": "rollout_seconds"}


def _rollout_metrics(stored: dict) -> GRPOMetrics:
    """The GRPOMetrics of a batch's rollouts, from :func:`_rollout_sums` (or an older checkpoint's
    flat mapping)."""
    if "sums" in stored:
        return GRPOMetrics(stored["sums"], stored["counts"])
    sums, counts = {}, {}
    for k, v in stored.items():
        if k in _OLD_COUNTS:
            counts[_OLD_COUNTS[k]] = v
        elif k.startswith("_r_valid/"):
            counts["valid/" + k[len("_r_valid/"):]] = v
        else:
            sums[k] = v
    return GRPOMetrics(sums, counts)


def _buffer_problem(buffer, cfg, beta, vocab_size: int | None) -> str | None:
    """What is wrong with stored rollouts (None: nothing): a list of cfg.grad_accum micro-batches
    (or none) as :meth:`GRPO._sample` makes them, finite, with token ids inside the vocab."""
    if not isinstance(buffer, list) or len(buffer) not in (0, cfg.grad_accum):
        found = f"{len(buffer)} micro-batches" if isinstance(buffer, list) else type(buffer).__name__
        return f"found {found}, expected a list of {cfg.grad_accum} (grad_accum) micro-batches"
    required = {"input_ids", "labels", "advantages", "old_logps"} | ({"ref_logps"} if beta else set())
    for i, b in enumerate(buffer):
        where = f"micro-batch {i}"
        if not isinstance(b, dict) or not required <= set(b) or not set(b) <= required | {"rollout_sums"}:
            keys = sorted(b) if isinstance(b, dict) else type(b).__name__
            return f"{where} holds {keys}, expected {sorted(required)} (and rollout_sums)"
        ids, labels = b["input_ids"], b["labels"]
        for name in required:
            t = b[name]
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                return f"{where} {name} is a {type(t).__name__}, expected a dense tensor"
        if ids.dtype != torch.long or labels.dtype != torch.long or ids.dim() != 2 or labels.shape != ids.shape:
            return (f"{where} input_ids {ids.dtype} {list(ids.shape)} and labels {labels.dtype} {list(labels.shape)}, "
                    f"expected int64 [rows, tokens] of the same shape")
        rows = ids.shape[0]
        if rows == 0 or rows % cfg.grpo.num_generations:
            return (f"{where} holds {rows} rollouts, expected a multiple of num_generations "
                    f"{cfg.grpo.num_generations}")
        top = vocab_size if vocab_size is not None else 2 ** 62
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= top):
            return f"{where} input_ids has token ids outside [0, {top})"
        if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= top))).any()):
            return f"{where} labels has values other than {IGNORE_INDEX} and token ids in [0, {top})"
        logps = [(k, list(ids.shape)) for k in sorted(required) if k.endswith("_logps")]
        for name, shape in [("advantages", [rows])] + logps:
            t = b[name]
            if not t.is_floating_point() or list(t.shape) != shape:
                return f"{where} {name} is {t.dtype} {list(t.shape)}, expected floating point {shape}"
            if not bool(torch.isfinite(t).all()):
                return f"{where} {name} holds non-finite values (NaN or inf)"
        stored = b.get("rollout_sums", {})
        # {"sums": table, "counts": table} (_rollout_sums), or one table (an older version's)
        tables = [stored.get("sums"), stored.get("counts")] if isinstance(stored, dict) and set(stored) == {
            "sums", "counts"} else [stored]
        if not all(_number_table(t) for t in tables):
            return f"{where} rollout_sums is not a table of names to numbers"
    return None


def _number_table(t) -> bool:
    return isinstance(t, dict) and all(isinstance(k, str) and type(v) in (int, float) for k, v in t.items())


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
