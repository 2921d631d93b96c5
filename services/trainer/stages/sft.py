"""Stage 2 — supervised fine-tuning on human demonstrations; the loss covers assistant tokens only.

Starts from the final pre-training checkpoint. Each epoch visits the conversations in a permutation
drawn from (seed, epoch), so the data position is just the step and resume is exact.
"""

from __future__ import annotations

import time

import torch

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import load_sft
from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    Throughput,
    latest_checkpoint,
    lr_at,
    make_optimizer,
    model_from_checkpoint,
    previous_stage,
    save_stage,
    stage_dir,
    stage_done,
    tokenizer_from_checkpoint,
)
from chatrl.services.trainer.stages.data import resolve_data

STAGE = "sft"


def encode_conversations(tok: ChatTokenizer, convs: list[list[dict]], max_len: int
                         ) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation, truncated to max_len; those left without any
    assistant token are dropped."""
    out = []
    for conv in convs:
        ids, mask = tok.render_chat(conv)
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) > 0:
            out.append((ids, mask))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, loss_mask) [B, T]."""
    t = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(examples), t, dtype=torch.long)
    lm = torch.zeros(len(examples), t, dtype=torch.float32)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lm[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, att, lm


def batch_indices(n: int, step: int, batch: int, seed: int) -> list[int]:
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[i * batch: (i + 1) * batch].tolist()


def sft_loss(model: GPT, ids: torch.Tensor, att: torch.Tensor, lm: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        logits = model(ids[:, :-1], att[:, :-1]).logits
    return algos.lm_loss(logits.float(), ids[:, 1:], lm[:, 1:])


def run(cfg: RunConfig, reporter: Reporter | None = None, init: str | None = None) -> StageResult:
    reporter = reporter or Reporter()
    sc = cfg.sft
    root = stage_dir(cfg, STAGE)
    done = stage_done(root)
    if done is not None:
        reporter.log(f"sft: already finished ({done.path})")
        return StageResult(STAGE, done.path, done.manifest["meta"].get("metrics", {}))
    base = previous_stage(cfg, "pretrain", init)
    tok = tokenizer_from_checkpoint(base)
    model = model_from_checkpoint(base, device=cfg.device)
    max_len = min(sc.max_len, model.cfg.max_seq_len)
    convs = load_sft(resolve_data(cfg).sft)
    data = encode_conversations(tok, convs, max_len)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(data), generator=g).tolist()
    n_eval = max(1, min(200, len(data) // 20))
    held = [data[i] for i in perm[:n_eval]]
    train = [data[i] for i in perm[n_eval:]]
    opt = make_optimizer(model, sc.lr, sc.weight_decay)
    start = 0
    ck = latest_checkpoint(root)
    if ck is not None:
        model.load_state_dict(ck.model_state(cfg.device))
        if (opt_state := ck.optimizer_state()) is not None:
            opt.load_state_dict(opt_state)
        ck.restore_rng()
        start = ck.step
        reporter.log(f"sft: resuming from step {start}")
    reporter.log(f"sft: {len(train)} conversations ({len(held)} held out), {sc.steps} steps × {sc.batch_size}")
    metrics: dict[str, float] = {"eval_loss_before": evaluate(model, held, tok, cfg)} if start == 0 else {}
    t0 = time.perf_counter()
    thr = Throughput()
    reporter.start(STAGE, sc.steps, start)
    model.train()
    loss_acc, n_acc = 0.0, 0
    for step in range(start, sc.steps):
        reporter.check_cancelled()
        lr = lr_at(step, sc.steps, sc.lr, sc.warmup_steps, sc.min_lr_ratio)
        for grp in opt.param_groups:
            grp["lr"] = lr
        batch = [train[i] for i in batch_indices(len(train), step, sc.batch_size, cfg.seed)]
        ids, att, lm = (t.to(cfg.device) for t in collate(batch, tok.pad_id))
        loss = sft_loss(model, ids, att, lm, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), sc.grad_clip)
        opt.step()
        thr.add(int(att.sum()))
        loss_acc += loss.item()
        n_acc += 1
        s = step + 1
        reporter.progress(STAGE, s, sc.steps)
        if s % sc.log_every == 0 or s == sc.steps:
            reporter.metrics(STAGE, s, sc.steps, {"loss": loss_acc / n_acc, "lr": lr, "grad_norm": float(gn),
                                                  "tokens_per_s": thr.rate()})
            loss_acc, n_acc = 0.0, 0
        if s % sc.ckpt_every == 0 and s < sc.steps:
            save_stage(cfg, STAGE, s, model, tok, opt, {"data_position": s})
    metrics.update({"eval_loss": evaluate(model, held, tok, cfg), "tokens_per_s": thr.rate(),
                    "seconds": time.perf_counter() - t0})
    reporter.metrics(STAGE, sc.steps, sc.steps, metrics)
    reporter.finish(STAGE)
    ck = save_stage(cfg, STAGE, sc.steps, model, tok, None, {"data_position": sc.steps, "metrics": metrics},
                    final=True)
    reporter.log(f"sft: done, held-out assistant-token loss {metrics.get('eval_loss_before', float('nan')):.3f}"
                 f" → {metrics['eval_loss']:.3f}")
    return StageResult(STAGE, ck.path, metrics, metrics["seconds"])


@torch.no_grad()
def evaluate(model: GPT, held: list, tok: ChatTokenizer, cfg: RunConfig) -> float:
    model.eval()
    tot, n = 0.0, 0.0
    for i in range(0, len(held), 32):
        ids, att, lm = (t.to(cfg.device) for t in collate(held[i: i + 32], tok.pad_id))
        w = float(lm[:, 1:].sum())
        tot += float(sft_loss(model, ids, att, lm, cfg)) * w
        n += w
    model.train()
    return tot / max(n, 1.0)
