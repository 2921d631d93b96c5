"""The supervised loop, once, for every stage that minimises a loss over fixed data: pre-training,
SFT and the reward model.

A stage hands :func:`train` a model, a :class:`Schedule` and a :class:`SupervisedTask` — its batches,
its loss, its held-out evaluation, its final metadata — and the loop does the rest:

- **resume** from the stage's latest checkpoint: weights, optimizer state, RNG state and the data
  position. Batches are a pure function of the step (``task.batch(step)``), so the data position *is*
  the step and a resumed run sees exactly the batches an uninterrupted one would;
- **schedule**: linear warmup to the peak LR, cosine decay to ``peak * min_lr_ratio``; AdamW with weight
  decay on matrices only; gradient clipping by global norm;
- **reporting** through the :class:`~chatrl.services.trainer.stages.common.Reporter`: progress every
  step, metrics (means over the window since the last report, LR, gradient norm, tokens/s) every
  ``log_every`` steps; **cancellation** checked before every step;
- **checkpoints** every ``ckpt_every`` steps (with optimizer and RNG, to resume) and a final one
  (weights only, marked final: a finished stage is not trained again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chatrl.services.core.checkpoint import latest_checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.model import GPT
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    Throughput,
    lr_at,
    make_optimizer,
    save_stage,
    stage_dir,
    stage_done,
)


@dataclass
class Schedule:
    """How long and how fast one stage trains."""

    steps: int  # optimizer steps in all
    lr: float  # peak learning rate
    warmup_steps: int  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float  # cosine floor, as a fraction of lr
    weight_decay: float
    grad_clip: float  # max global gradient norm
    log_every: int  # steps between metric reports (and one at the end)
    ckpt_every: int  # steps between resumable checkpoints; 0 = only the final one


class SupervisedTask:
    """What a stage supplies to :func:`train`. Subclasses set ``stage`` and implement ``batch``,
    ``loss`` and ``evaluate``; the rest is optional."""

    stage: str = ""
    eval_before: bool = False  # also evaluate the starting model (reported as ``<metric>_before``)

    def batch(self, step: int) -> Any:
        """The batch of optimizer step ``step`` — a pure function of the step (that makes resume exact)."""
        raise NotImplementedError

    def loss(self, model: GPT, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        """(scalar loss to minimise, extra metrics to average over the log window, tokens processed)."""
        raise NotImplementedError

    def evaluate(self, model: GPT) -> dict[str, float]:
        """Held-out metrics; called in eval mode under ``torch.no_grad`` (as is ``finish``)."""
        return {}

    def finish(self, model: GPT, metrics: dict[str, float]) -> tuple[dict[str, float], dict]:
        """After the last step: (more metrics, extra manifest metadata of the final checkpoint)."""
        return {}, {}

    def summary(self, metrics: dict[str, float]) -> str:
        """The closing log line."""
        return f"{self.stage}: done"


def finished(cfg: RunConfig, stage: str, reporter: Reporter) -> StageResult | None:
    """The result of a stage that already wrote its final checkpoint (nothing is trained again)."""
    done = stage_done(stage_dir(cfg, stage))
    if done is None:
        return None
    reporter.log(f"{stage}: already finished ({done.path})")
    return StageResult(stage, done.path, done.manifest["meta"].get("metrics", {}))


def shuffled_batch(n: int, step: int, batch: int, seed: int, drop_last: bool) -> list[int]:
    """Indices (into ``n`` examples) of the batch at ``step`` when the data are visited epoch after
    epoch, each epoch in a fresh random order that depends on (seed, epoch) only. ``drop_last``: an
    epoch has ``n // batch`` full batches; otherwise ``ceil(n / batch)``, the last one short."""
    per_epoch = max(1, n // batch) if drop_last else max(1, math.ceil(n / batch))
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
    return perm[i * batch: (i + 1) * batch].tolist()


@torch.no_grad()
def _in_eval_mode(fn: Callable[..., Any], model: GPT, *args: Any) -> Any:
    model.eval()
    try:
        return fn(model, *args)
    finally:
        model.train()


def train(cfg: RunConfig, task: SupervisedTask, model: GPT, tok: ChatTokenizer, sched: Schedule,
          reporter: Reporter, on_start: Callable[[int], None] | None = None) -> StageResult:
    """Train ``model`` on ``task`` under ``sched``, resuming from the stage's latest checkpoint; returns
    the final checkpoint. ``on_start(first_step)`` runs once the resume point is known (a stage logs
    what it is about to do)."""
    stage = task.stage
    opt = make_optimizer(model, sched.lr, sched.weight_decay)
    start, before = 0, {}
    ck = latest_checkpoint(stage_dir(cfg, stage))
    if ck is not None:  # a resumable checkpoint (a final one would have ended the stage before this)
        model.load_state_dict(ck.model_state(cfg.device))
        if (opt_state := ck.optimizer_state()) is not None:
            opt.load_state_dict(opt_state)
        ck.restore_rng()
        start = ck.step
        before = dict(ck.manifest["meta"].get("metrics_before", {}))
        reporter.log(f"{stage}: resuming from step {start} ({ck.path.name})")
    elif task.eval_before:
        before = {f"{k}_before": v for k, v in _in_eval_mode(task.evaluate, model).items()}
    if on_start is not None:
        on_start(start)
    thr = Throughput()
    t0 = time.perf_counter()
    reporter.start(stage, sched.steps, start)
    model.train()
    window: dict[str, float] = {}
    n_window = 0
    last: dict[str, float] = {}
    for step in range(start, sched.steps):
        reporter.check_cancelled()
        lr = lr_at(step, sched.steps, sched.lr, sched.warmup_steps, sched.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, extra, tokens = task.loss(model, task.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), sched.grad_clip)
        opt.step()
        thr.add(tokens)
        for k, v in {"loss": loss.item(), **extra}.items():
            window[k] = window.get(k, 0.0) + float(v)
        n_window += 1
        s = step + 1
        reporter.progress(stage, s, sched.steps)
        if s % sched.log_every == 0 or s == sched.steps:
            last = {**{k: v / n_window for k, v in window.items()}, "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": thr.rate()}
            window, n_window = {}, 0
            reporter.metrics(stage, s, sched.steps, last)
        if sched.ckpt_every > 0 and s % sched.ckpt_every == 0 and s < sched.steps:
            save_stage(cfg, stage, s, model, tok, opt, {"data_position": s, "metrics_before": before})
    metrics = {**last, **before, **_in_eval_mode(task.evaluate, model)}
    more, meta = _in_eval_mode(task.finish, model, metrics)
    metrics.update(more)
    metrics.update({"tokens_per_s": thr.rate(), "seconds": time.perf_counter() - t0})
    reporter.metrics(stage, sched.steps, sched.steps, metrics)
    reporter.finish(stage)
    final = save_stage(cfg, stage, sched.steps, model, tok, None,
                       {"data_position": sched.steps, "metrics": metrics, **meta}, final=True)
    reporter.log(task.summary(metrics))
    return StageResult(stage, final.path, metrics, metrics["seconds"])
