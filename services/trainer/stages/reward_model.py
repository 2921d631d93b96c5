"""Stage 3a — the reward model: learn human rankings with a Bradley–Terry loss.

Rankings come from ``data.rankings_file`` (people, via the feedback service's export) or, in the
embedded default, from the *simulated labelers*: the SFT policy samples K responses per prompt and a
noisy gold preference function (a stand-in for people) ranks them. The reward model never sees the
gold function, only these rankings. All C(K,2) pairs of one prompt form one batch element
(InstructGPT). The RM starts from the SFT weights with a fresh scalar head; after training, a bias is
set so the SFT samples' rewards average 0.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import Ranking, load_pairs, load_prompts, load_rankings, write_jsonl
from chatrl.services.core.generate import SamplingParams, generate
from chatrl.services.core.model import GPT
from chatrl.services.core.scoring import last_token_scalar, pair_ids
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    lr_at,
    make_optimizer,
    model_from_checkpoint,
    previous_stage,
    run_dir,
    save_stage,
    stage_dir,
    stage_done,
    tokenizer_from_checkpoint,
)
from chatrl.services.trainer.stages.data import resolve_data

STAGE = "reward"


def sample_responses(model: GPT, tok: ChatTokenizer, prompts: list[str], k: int, temperature: float,
                     max_new_tokens: int, seed: int, cfg: RunConfig, batch_prompts: int = 8
                     ) -> list[tuple[list[str], list[bool]]]:
    """K sampled responses per prompt: (texts, finished flags)."""
    out = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = prompts[i: i + batch_prompts]
        seqs, params = [], []
        for j, p in enumerate(chunk):
            ids = tok.prompt_ids(p)[-(model.cfg.max_seq_len - max_new_tokens):]
            for s in range(k):
                seqs.append(ids)
                params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                             seed=seed + (i + j) * 1000 + s, stop_token_ids=(tok.end_id,)))
        samples = generate(model, seqs, params, tok.pad_id, cfg.dtype, cfg.device)
        for j in range(len(chunk)):
            dec = [tok.response_text(s.tokens) for s in samples[j * k:(j + 1) * k]]
            out.append(([d[0] for d in dec], [d[1] for d in dec]))
    return out


def simulate_rankings(model: GPT, tok: ChatTokenizer, prompts: list[str], gold_path: Path, cfg: RunConfig,
                      reporter: Reporter) -> list[Ranking]:
    """The simulated labelers (stand-ins for people) rank K samples of the current policy per prompt."""
    from chatrl.services.core.gold import GoldLabeler

    rc = cfg.reward
    gold = GoldLabeler.load(gold_path)
    rng = np.random.default_rng(cfg.seed + 17)
    t0 = time.perf_counter()
    samples = sample_responses(model, tok, prompts, rc.k, rc.temperature, rc.max_new_tokens, cfg.seed, cfg)
    rankings = [Ranking(p, texts, [int(x) for x in gold.rank(p, texts, fin, rng, rc.label_noise)], fin)
                for p, (texts, fin) in zip(prompts, samples)]
    reporter.log(f"reward: simulated labelers ranked {len(rankings)} prompts × K={rc.k} "
                 f"in {time.perf_counter() - t0:.1f}s")
    return rankings


def encode_rankings(tok: ChatTokenizer, rankings: list[Ranking], max_len: int) -> list[tuple[list[list[int]], list[int]]]:
    return [([pair_ids(tok, r.prompt, resp, fin, max_len) for resp, fin in zip(r.responses, r.finished)],
             r.ranking) for r in rankings]


def rm_batch_loss(model: GPT, batch: list[tuple[list[list[int]], list[int]]], pad_id: int, cfg: RunConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores every response of every prompt in one forward; BT loss over all pairs per prompt."""
    k = max(len(seqs) for seqs, _ in batch)
    flat = [s for seqs, _ in batch for s in seqs]
    scores = last_token_scalar(model, flat, pad_id, cfg.dtype, cfg.device)
    rewards = torch.zeros(len(batch), k, device=scores.device)
    ranking = torch.full((len(batch), k), -1, dtype=torch.long, device=scores.device)
    pos = 0
    for i, (seqs, rk) in enumerate(batch):
        rewards[i, : len(seqs)] = scores[pos: pos + len(seqs)]
        ranking[i, : len(rk)] = torch.tensor(rk)
        pos += len(seqs)
    loss, acc = algos.ranking_loss(rewards, ranking)
    return loss, acc, scores


def run(cfg: RunConfig, reporter: Reporter | None = None, init: str | None = None,
        rankings: list[Ranking] | None = None, stage: str = STAGE) -> StageResult:
    """Train a reward model. ``rankings`` may be passed in (e.g. exported from the feedback service)."""
    reporter = reporter or Reporter()
    rc = cfg.reward
    root = stage_dir(cfg, stage)
    done = stage_done(root)
    if done is not None:
        reporter.log(f"{stage}: already finished ({done.path})")
        return StageResult(stage, done.path, done.manifest["meta"].get("metrics", {}))
    base = previous_stage(cfg, "sft", init)
    tok = tokenizer_from_checkpoint(base)
    t0 = time.perf_counter()
    data = resolve_data(cfg)
    if rankings is None:
        rankings = get_rankings(cfg, base, tok, data, reporter)
    if cfg.data.pairs_file:
        rankings = rankings + [Ranking(p["prompt"], [p["chosen"], p["rejected"]], [0, 1], [True, True])
                               for p in load_pairs(Path(cfg.data.pairs_file))]
    if len(rankings) < 2:
        raise ValueError(f"reward model needs at least 2 rankings, got {len(rankings)}")
    torch.manual_seed(cfg.seed + 1)  # the fresh scalar head depends on the seed only
    model = model_from_checkpoint(base, scalar_head=True, device=cfg.device)
    enc = encode_rankings(tok, rankings, model.cfg.max_seq_len)
    perm = torch.randperm(len(enc), generator=torch.Generator().manual_seed(cfg.seed + 3)).tolist()
    n_eval = max(1, int(len(enc) * rc.eval_fraction))
    held = [enc[i] for i in perm[:n_eval]]
    train = [enc[i] for i in perm[n_eval:]]
    steps_per_epoch = math.ceil(len(train) / rc.batch_size)
    total = max(1, rc.epochs * steps_per_epoch)
    opt = make_optimizer(model, rc.lr, rc.weight_decay)
    metrics: dict[str, float] = {"eval_accuracy_before": evaluate(model, held, tok, cfg)[1]}
    reporter.log(f"{stage}: {len(train)} rankings ({sum(len(r) * (len(r) - 1) // 2 for _, r in train)} pairs), "
                 f"{len(held)} held out, {total} steps")
    reporter.start(stage, total)
    model.train()
    step = 0
    for epoch in range(rc.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 31 + epoch)).tolist()
        for b in range(steps_per_epoch):
            reporter.check_cancelled()
            batch = [train[i] for i in order[b * rc.batch_size:(b + 1) * rc.batch_size]]
            if not batch:
                continue
            lr = lr_at(step, total, rc.lr, max(1, total // 20), 0.1)
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss, acc, _ = rm_batch_loss(model, batch, tok.pad_id, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), rc.grad_clip)
            opt.step()
            step += 1
            reporter.progress(stage, step, total)
            if step % rc.log_every == 0 or step == total:
                reporter.metrics(stage, step, total, {"loss": loss.item(), "accuracy": float(acc), "lr": lr})
    eval_loss, eval_acc, scores = evaluate(model, held + train, tok, cfg, return_scores=True)
    bias = algos.reward_bias(torch.tensor(scores))
    metrics.update({"eval_accuracy": evaluate(model, held, tok, cfg)[1], "train_loss": eval_loss,
                    "train_accuracy": eval_acc, "reward_bias": bias, "seconds": time.perf_counter() - t0})
    reporter.metrics(stage, total, total, metrics)
    reporter.finish(stage)
    ck = save_stage(cfg, stage, total, model, tok, None, {"metrics": metrics, "reward_bias": bias,
                                                          "num_rankings": len(rankings)}, final=True)
    reporter.log(f"{stage}: done, held-out pairwise accuracy {metrics['eval_accuracy_before']:.3f} → "
                 f"{metrics['eval_accuracy']:.3f}, bias {bias:+.3f}")
    return StageResult(stage, ck.path, metrics, metrics["seconds"])


def get_rankings(cfg: RunConfig, base, tok: ChatTokenizer, data, reporter: Reporter) -> list[Ranking]:
    if cfg.data.rankings_file:
        return load_rankings(Path(cfg.data.rankings_file))
    if data.gold is None:
        raise FileNotFoundError("no rankings: set data.rankings_file (labels from people) or data.gold_file "
                                "(the simulated labeler)")
    out = run_dir(cfg) / "data" / "rankings_simulated.jsonl"
    if out.exists():
        return load_rankings(out)
    policy = model_from_checkpoint(base, device=cfg.device)
    prompts = load_prompts(data.prompts)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(prompts), size=min(cfg.reward.num_prompts, len(prompts)), replace=False)
    rankings = simulate_rankings(policy, tok, [prompts[i] for i in pick], data.gold, cfg, reporter)
    write_jsonl(out, [r.to_dict() for r in rankings])
    return rankings


@torch.no_grad()
def evaluate(model: GPT, held: list, tok: ChatTokenizer, cfg: RunConfig, return_scores: bool = False):
    """(mean BT loss, pairwise accuracy[, raw scores of every response]) over the given rankings."""
    model.eval()
    losses, accs, weights, scores = [], [], [], []
    for i in range(0, len(held), 16):
        batch = held[i: i + 16]
        loss, acc, sc = rm_batch_loss(model, batch, tok.pad_id, cfg)
        losses.append(float(loss))
        accs.append(float(acc))
        weights.append(len(batch))
        scores += sc.tolist()
    model.train()
    w = np.asarray(weights, dtype=float)
    res = (float(np.average(losses, weights=w)), float(np.average(accs, weights=w)))
    return (*res, scores) if return_scores else res
