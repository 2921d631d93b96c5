"""Stage 3b — PPO against the reward model, with a per-token KL penalty to the frozen SFT model.

One iteration: ``collect(prompts, version)`` returns experience (sampled by policy-inference, scored by
reward-scoring, reference logprobs from reference-model — in the pipeline via Ray rollout workers);
the trainer computes values, KL-penalised rewards, GAE advantages and runs PPO epochs over minibatches
(+ an optional pre-training loss, PPO-ptx), updates the adaptive β, then ``push(state_dict, version)``
sends the new weights to policy-inference. This module imports neither gRPC nor Ray: the pipeline
hands it those two callables.

Every iteration is checkpointed (policy, value model, both optimizers, β, iteration, RNG), so a killed
run resumes at the last finished iteration.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatrl.services.core.checkpoint import Checkpoint, flatten_optimizer, latest_checkpoint, save_checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import load_prompts
from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import (
    Reporter,
    make_optimizer,
    model_from_checkpoint,
    stage_dir,
    tokenizer_from_checkpoint,
)


@dataclass
class Experience:
    """One sampled response and everything PPO needs about it."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # behaviour-policy logprobs from policy-inference
    ref_logprobs: list[float]  # reference (SFT) logprobs of the same tokens
    score: float  # reward-model score (bias included)
    finished: bool  # the response ended its turn with the end token
    version: int  # policy version that produced it
    text: str = ""


Collect = Callable[[list[str], int, int], list[Experience]]  # (prompts, policy version, seed) → experience
# like Collect, but returns at once with a function that waits for the experience (rollouts in flight)
Submit = Callable[[list[str], int, int], Callable[[], list[Experience]]]
Push = Callable[[dict, int], None]  # (state_dict, new version) → None


@dataclass
class PPOResult:
    checkpoint: Path
    version: int
    history: list[dict] = field(default_factory=list)


def stage_name(round_: int) -> str:
    return f"ppo_r{round_}"


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] prompt+response, right-padded
    att: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] action mask on targets ids[:, 1:]
    old_logprobs: torch.Tensor  # [B, L-1]
    ref_logprobs: torch.Tensor  # [B, L-1]
    scores: torch.Tensor  # [B]


def make_batch(exps: list[Experience], pad_id: int) -> Batch:
    """Align experience on the teacher-forcing grid: logits at position j predict ids[j+1]; response
    token k of a sample with prompt length P sits at target position P-1+k."""
    seqs = [e.prompt_ids + e.response_ids for e in exps]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(exps), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(exps), L, dtype=torch.long)
    mask = torch.zeros(len(exps), L - 1)
    old = torch.zeros(len(exps), L - 1)
    ref = torch.zeros(len(exps), L - 1)
    for i, (e, s) in enumerate(zip(exps, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        p, r = len(e.prompt_ids), len(e.response_ids)
        mask[i, p - 1: p - 1 + r] = 1
        old[i, p - 1: p - 1 + r] = torch.tensor(e.logprobs, dtype=torch.float32)
        ref[i, p - 1: p - 1 + r] = torch.tensor(e.ref_logprobs, dtype=torch.float32)
    return Batch(ids, att, mask, old, ref, torch.tensor([e.score for e in exps], dtype=torch.float32))


def policy_forward(model: GPT, b: Batch, cfg: RunConfig, temperature: float,
                   entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [B, L-1] of the taken tokens, entropy [B, L-1]) at response positions, 0 elsewhere.

    The LM head and the softmax run on response tokens only: prompt positions never enter a PPO loss,
    and with prompts as long as responses that halves the costliest part after the transformer body.
    ``entropy_grad=False`` computes the entropy (a statistic then) without a graph."""
    sel = b.mask.bool()
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        hidden = model(b.ids[:, :-1], b.att[:, :-1], lm_head=False).hidden
        logits = model.lm_head(hidden[sel])  # [N, V], N = response tokens in the batch
    logits = logits.float() / temperature
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=logits.device)
    lp = zeros.masked_scatter(sel, algos.logprobs_from_logits(logits, b.ids[:, 1:][sel]))
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = zeros.masked_scatter(sel, algos.entropy_from_logits(logits))
    return lp, ent


def value_forward(critic: GPT, b: Batch, cfg: RunConfig) -> torch.Tensor:
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        out = critic(b.ids[:, :-1], b.att[:, :-1], lm_head=False)
    return out.scalar.float()


class PPOTrainer:
    """Holds the policy, value model, optimizers and KL controller of one PPO stage (one round)."""

    def __init__(self, cfg: RunConfig, policy_init: Checkpoint, value_init: Checkpoint, round_: int,
                 reporter: Reporter) -> None:
        pc = cfg.ppo
        self.cfg, self.pc, self.round = cfg, pc, round_
        self.tok: ChatTokenizer = tokenizer_from_checkpoint(policy_init)
        self.policy = model_from_checkpoint(policy_init, device=cfg.device)
        self.critic = model_from_checkpoint(value_init, scalar_head=True, device=cfg.device)
        self.opt_p = make_optimizer(self.policy, pc.lr, 0.0)
        self.opt_v = make_optimizer(self.critic, pc.value_lr, 0.0)
        self.kl_ctl = (algos.AdaptiveKLController(pc.init_kl_coef, pc.kl_target, pc.kl_horizon) if pc.adaptive_kl
                       else algos.FixedKLController(pc.init_kl_coef))
        self.iteration = 0
        self.version = 0
        self.ptx_tokens = None  # PPO-ptx: the pre-training corpus, tokenised (cached in the run dir)
        if pc.ptx_coef > 0:
            from chatrl.services.trainer.stages.pretrain import corpus_tokens

            self.ptx_tokens = torch.from_numpy(corpus_tokens(cfg, self.tok).astype(np.int64))
        self.root = stage_dir(cfg, stage_name(round_))

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, final: bool = False, metrics: dict | None = None) -> Checkpoint:
        name = "final" if final else f"iter-{self.iteration:05d}"
        opt = None if final else self.opt_p.state_dict()
        extra, vmeta = {"value": self.critic.state_dict()}, None
        if not final:  # the value optimizer too, flattened into tensors + metadata
            vtensors, vmeta = flatten_optimizer(self.opt_v.state_dict())
            if vtensors:
                extra["value_optimizer"] = vtensors
        return save_checkpoint(
            self.root, name, stage="ppo", step=self.iteration, model_state=self.policy.state_dict(),
            model_config=self.policy.cfg.to_dict(), tokenizer_json=self.tok.to_str(), optimizer_state=opt,
            extra_tensors=extra,
            meta={"round": self.round, "iteration": self.iteration, "policy_version": self.version,
                  "kl_controller": self.kl_ctl.state_dict(), "final": final, "metrics": metrics or {},
                  "value_optimizer": vmeta, "run_config": self.cfg.to_dict()})

    def restore(self, ck: Checkpoint) -> None:
        self.policy.load_state_dict(ck.model_state(self.cfg.device))
        self.critic.load_state_dict(ck.tensors("value", self.cfg.device))
        if (st := ck.optimizer_state()) is not None:
            self.opt_p.load_state_dict(st)
        meta = ck.manifest["meta"]
        if meta.get("value_optimizer") and ck.has("value_optimizer"):
            from chatrl.services.core.checkpoint import unflatten_optimizer

            self.opt_v.load_state_dict(unflatten_optimizer(ck.tensors("value_optimizer"), meta["value_optimizer"]))
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.iteration = int(meta["iteration"])
        self.version = int(meta["policy_version"])
        ck.restore_rng()

    # --- one iteration -------------------------------------------------------------------------
    def step(self, exps: list[Experience]) -> dict[str, float]:
        """PPO update on one batch of experience. Returns metrics."""
        pc, cfg = self.pc, self.cfg
        exps = [e for e in exps if e.response_ids]
        if not exps:
            raise RuntimeError("no experience to learn from (every response was empty)")
        b = make_batch(exps, self.tok.pad_id)
        scores = algos.normalize_rewards(b.scores, 0.0).clamp(-pc.reward_clip, pc.reward_clip)
        self.policy.eval()
        self.critic.eval()
        with torch.no_grad():
            if pc.old_logprobs == "recompute":
                old_lp, _ = policy_forward(self.policy, b, cfg, pc.temperature)  # 0 off the response
            else:
                old_lp = b.old_logprobs
            old_values = value_forward(self.critic, b, cfg) * b.mask
            rewards, kl = algos.kl_penalized_rewards(old_lp, b.ref_logprobs, b.mask, scores, self.kl_ctl.value,
                                                     pc.kl_estimator)
            adv, returns = algos.gae(rewards, old_values, b.mask, pc.gamma, pc.lam)
            if pc.whiten_advantages:
                adv = algos.masked_whiten(adv, b.mask)
        seq_kl = float((kl * b.mask).sum(dim=1).mean())
        logprob_gap = float(algos.masked_mean((old_lp - b.old_logprobs).abs(), b.mask))
        self.policy.train()
        self.critic.train()
        n = len(exps)
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(self.cfg.seed * 1009 + self.round * 100003 + self.iteration)
        for _epoch in range(pc.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, pc.minibatch_size):
                idx = perm[s: s + pc.minibatch_size]
                mb = Batch(b.ids[idx], b.att[idx], b.mask[idx], old_lp[idx], b.ref_logprobs[idx], b.scores[idx])
                lp, ent = policy_forward(self.policy, mb, cfg, pc.temperature, entropy_grad=pc.entropy_coef != 0)
                pl, pst = algos.policy_loss(lp, mb.old_logprobs, adv[idx], mb.mask, pc.clip_eps)
                loss = pl
                if pc.entropy_coef:
                    loss = loss - pc.entropy_coef * algos.masked_mean(ent, mb.mask)
                if self.ptx_tokens is not None:
                    from chatrl.services.trainer.stages.pretrain import batch_at

                    xb = batch_at(self.ptx_tokens, self.iteration * 1000 + s, cfg.seed, pc.minibatch_size,
                                  min(cfg.pretrain.seq_len, self.policy.cfg.max_seq_len - 1)).to(cfg.device)
                    with autocast(cfg.dtype, cfg.device.split(":")[0]):
                        ptx_logits = self.policy(xb[:, :-1]).logits
                    ptx = algos.ppo_ptx_loss(ptx_logits.float(), xb[:, 1:], coef=pc.ptx_coef)
                    loss = loss + ptx
                    stats.setdefault("ptx_loss", []).append(float(ptx) / pc.ptx_coef)
                self.opt_p.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), pc.grad_clip)
                self.opt_p.step()
                v = value_forward(self.critic, mb, cfg)
                vl, vst = algos.value_loss(v, old_values[idx], returns[idx], mb.mask, pc.value_clip)
                self.opt_v.zero_grad(set_to_none=True)
                vl.backward()
                torch.nn.utils.clip_grad_norm_(self.critic.parameters(), pc.grad_clip)
                self.opt_v.step()
                for k, val in {"policy_loss": pl.item(), "value_loss": vl.item(), "grad_norm": float(gn),
                               "entropy": float(algos.masked_mean(ent.detach(), mb.mask)), **pst, **vst}.items():
                    stats.setdefault(k, []).append(val)
        self.kl_ctl.update(seq_kl, n)
        self.iteration += 1
        lens = [len(e.response_ids) for e in exps]
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update({"reward": float(b.scores.mean()), "kl": seq_kl, "beta": self.kl_ctl.value, "kl_target": pc.kl_target,
                    "response_len": float(np.mean(lens)), "finished": float(np.mean([e.finished for e in exps])),
                    "logprob_gap": logprob_gap, "samples": float(n),
                    "kl_penalized_reward": float(b.scores.mean()) - self.kl_ctl.value * seq_kl})
        return out


def run(cfg: RunConfig, reporter: Reporter, *, round_: int, policy_init: Checkpoint, value_init: Checkpoint,
        collect: Collect | None = None, push: Push, start_version: int, prompts_file: Path,
        observe: Callable[[list[Experience]], dict[str, float]] | None = None,
        submit: Submit | None = None) -> PPOResult:
    """Run (or resume) the PPO iterations of one round. ``start_version`` is the policy-inference
    version currently serving ``policy_init``'s weights.

    With ``ppo.async_rollout`` (and ``submit``), the rollout of iteration i+1 is issued before the update
    of iteration i, so generation overlaps training; its samples come from the policy one version
    behind (staleness 1), are kept only within ``ppo.max_staleness``, and PPO's ratio uses the
    behaviour logprobs they were sampled with."""
    pc = cfg.ppo
    if submit is None:
        if collect is None:
            raise ValueError("ppo.run needs collect or submit")
        submit = lambda ps, ver, seed: (lambda: collect(ps, ver, seed))  # noqa: E731
    overlap = pc.async_rollout
    if overlap and pc.max_staleness < 1:
        raise ValueError("ppo.async_rollout needs ppo.max_staleness >= 1 (its samples are one version old)")
    if overlap and pc.old_logprobs != "service":  # on a copy: the caller's config (and later rounds) keep theirs
        reporter.log("ppo: async_rollout uses the behaviour policy's logprobs (ppo.old_logprobs=service)")
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(pc, old_logprobs="service"))
        pc = cfg.ppo
    tr = PPOTrainer(cfg, policy_init, value_init, round_, reporter)
    name = stage_name(round_)
    done = latest_checkpoint(tr.root)
    if done is not None and done.manifest["meta"].get("final"):
        reporter.log(f"{name}: already finished ({done.path})")
        return PPOResult(done.path, int(done.manifest["meta"]["policy_version"]))
    tr.version = start_version
    if done is not None:
        tr.restore(done)
        reporter.log(f"{name}: resuming after iteration {tr.iteration}")
        tr.version = max(tr.version, start_version) + 1
        push(tr.policy.state_dict(), tr.version)  # policy-inference serves the restored weights
    prompts = load_prompts(prompts_file)

    def issue(it: int):
        rng = np.random.default_rng([cfg.seed, round_, it])
        pick = rng.choice(len(prompts), size=min(pc.prompts_per_iteration, len(prompts)), replace=False)
        return submit([prompts[i] for i in pick], tr.version, int(cfg.seed * 7 + round_ * 100_000 + it * 1000))

    history: list[dict] = []
    reporter.start(name, pc.iterations, tr.iteration)
    t0 = time.perf_counter()
    pending = None
    while tr.iteration < pc.iterations:
        reporter.check_cancelled()
        it = tr.iteration
        t_roll = time.perf_counter()
        exps = (pending or issue(it))()
        pending = issue(it + 1) if overlap and it + 1 < pc.iterations else None
        stale = [e for e in exps if tr.version - e.version > pc.max_staleness]
        exps = [e for e in exps if tr.version - e.version <= pc.max_staleness]
        t_upd = time.perf_counter()
        metrics = tr.step(exps)
        if observe is not None:
            metrics.update(observe(exps))
        t_push = time.perf_counter()
        tr.version += 1
        push(tr.policy.state_dict(), tr.version)
        metrics.update({"rollout_s": t_upd - t_roll, "update_s": t_push - t_upd, "push_s": time.perf_counter() - t_push,
                        "samples_per_s": len(exps) / max(1e-9, t_upd - t_roll), "dropped_stale": float(len(stale)),
                        "policy_version": float(tr.version)})
        history.append({"iteration": tr.iteration, **metrics})
        reporter.progress(name, tr.iteration, pc.iterations)
        reporter.metrics(name, tr.iteration, pc.iterations, metrics)
        if tr.iteration % pc.ckpt_every == 0 or tr.iteration == pc.iterations:
            tr.save(metrics=metrics)
    reporter.finish(name)
    ck = tr.save(final=True, metrics={"seconds": time.perf_counter() - t0, **(history[-1] if history else {})})
    return PPOResult(ck.path, tr.version, history)
