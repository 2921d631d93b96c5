"""The RL learner: the policy, the value model (PPO only), their optimizers and the KL controller of one round.

The RL loop (:mod:`chatrl.services.trainer.rl`) drives it each iteration: after the rollout source has
generated and scored the samples, :meth:`PPOTrainer.make_experience` computes old logprobs, values,
KL-penalised rewards and GAE advantages on the padded batch, and :meth:`PPOTrainer.update` runs the PPO
epochs over minibatches (+ an optional pre-training loss, PPO-ptx) and updates the adaptive β. The
math is in :mod:`chatrl.services.trainer.algos`; this module imports neither gRPC nor Ray.

``ppo.algorithm`` picks how advantages are made; everything else (the loop, pushes, checkpoints, metrics)
is shared. ``ppo``: a value model (initialised from the RM) and GAE. The critic-free siblings build no
value model — nothing of it is trained, checkpointed or pushed — and take the baseline from the
``samples_per_prompt`` responses to the same prompt: ``grpo`` (group mean and std), ``rloo`` (leave one
out), ``reinforce_pp`` (group mean, then whitened over the whole batch). Their KL to the reference is
either in the per-token reward, as PPO's (``ppo.kl_mode: reward``; the advantage is then the return to
go), or a term of the loss (``kl_mode: loss``, GRPO). All use the clipped ratio objective, averaged per
token or per sequence (``ppo.loss_norm``).

The logprob consistency gate: every make-experience also compares, for the samples drawn by exactly the
weights the trainer holds, policy-inference's logprobs with the trainer's fp32 recomputation
(``logprob_gate_max`` / ``_mean`` / ``_tokens``). Staleness cannot enter it; what remains is a real
disagreement (different weights, dtype, temperature, padding or cache handling).

Checkpoints hold the policy, the value model, both optimizers, β, the iteration and the RNG, so a killed
run resumes at the last checkpointed iteration.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from chatrl.services.core.checkpoint import (
    Checkpoint,
    flatten_optimizer,
    save_checkpoint,
    unflatten_optimizer,
)
from chatrl.services.core.config import RunConfig
from chatrl.services.core.lora import share_frozen_weights
from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.experience import ExperienceBatch
from chatrl.services.trainer.stages.common import (
    make_optimizer,
    model_from_checkpoint,
    stage_dir,
    tokenizer_from_checkpoint,
    with_lora,
)


def stage_name(round_: int) -> str:
    return f"ppo_r{round_}"


def loop_config(cfg: RunConfig) -> RunConfig:
    """The config PPO runs with. ``ppo.async_rollout`` learns from samples one version old, so PPO's ratio
    must use the logprobs they were sampled with (``old_logprobs: service``); returned on a copy, so the
    caller's config (and later rounds) keep theirs."""
    pc = cfg.ppo
    if pc.async_rollout and pc.max_staleness < 1:
        raise ValueError("ppo.async_rollout needs ppo.max_staleness >= 1 (its samples are one version old)")
    if pc.async_rollout and pc.old_logprobs != "service":
        return dataclasses.replace(cfg, ppo=dataclasses.replace(pc, old_logprobs="service"))
    return cfg


def policy_forward(model: GPT, b: ExperienceBatch, cfg: RunConfig, temperature: float,
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


def value_forward(critic: GPT, b: ExperienceBatch, cfg: RunConfig) -> torch.Tensor:
    """V(s_t) [B, L-1] from the value model's scalar head."""
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        out = critic(b.ids[:, :-1], b.att[:, :-1], lm_head=False)
    return out.scalar.float()


class PPOTrainer:
    """The models, optimizers and KL controller of one RL round. ``policy`` starts from the SFT weights,
    ``critic`` (a scalar-head GPT) from the reward model — PPO only: a critic-free ``ppo.algorithm`` must get
    ``critic=None``; ``ptx_tokens`` ([N] int64, the tokenised
    pre-training corpus) turns on PPO-ptx when ``ppo.ptx_coef > 0``. Build it from checkpoints with
    :meth:`from_checkpoints`; the config must have passed :func:`loop_config`."""

    def __init__(self, cfg: RunConfig, policy: GPT, critic: GPT, tok: ChatTokenizer, round_: int,
                 ptx_tokens: torch.Tensor | None = None) -> None:
        pc = cfg.ppo
        if pc.ptx_coef > 0 and ptx_tokens is None:
            raise ValueError("ppo.ptx_coef > 0 needs the pre-training tokens (ptx_tokens)")
        if (pc.algorithm == "ppo") != (critic is not None):
            raise ValueError(f"ppo.algorithm {pc.algorithm} {'needs' if critic is None else 'takes no'} value model")
        self.cfg, self.pc, self.round = cfg, pc, round_
        self.tok, self.policy, self.critic = tok, policy, critic
        self.opt_p = make_optimizer(self.policy, pc.lr, 0.0)
        self.opt_v = make_optimizer(self.critic, pc.value_lr, 0.0) if critic is not None else None
        self.gate: dict[str, float] = {}  # the logprob consistency gate of the last made batch
        self.kl_ctl = (algos.AdaptiveKLController(pc.init_kl_coef, pc.kl_target, pc.kl_horizon) if pc.adaptive_kl
                       else algos.FixedKLController(pc.init_kl_coef))
        self.ptx_tokens = ptx_tokens if pc.ptx_coef > 0 else None
        self.iteration = 0  # PPO updates done this round
        self.version = 0  # policy-inference version of the weights in self.policy
        self.root: Path = stage_dir(cfg, stage_name(round_))
        self.shared_base_bytes = 0  # frozen weights the value model shares with the policy (from_checkpoints)

    @classmethod
    def from_checkpoints(cls, cfg: RunConfig, policy_init: Checkpoint, value_init: Checkpoint | None, round_: int
                         ) -> PPOTrainer:
        cfg = loop_config(cfg)
        tok = tokenizer_from_checkpoint(policy_init)
        ptx = None
        if cfg.ppo.ptx_coef > 0:  # PPO-ptx: the pre-training corpus, tokenised (cached in the run dir)
            from chatrl.services.trainer.stages.pretrain import corpus_tokens

            ptx = torch.from_numpy(corpus_tokens(cfg, tok).astype(np.int64))
        if cfg.ppo.algorithm != "ppo":  # critic-free: no value model is built (value_init is not read)
            return cls(cfg, with_lora(cfg, model_from_checkpoint(policy_init, device=cfg.device)), None, tok, round_, ptx)
        # The value model is a second network (the reward model's backbone + scalar head), not a value head on
        # the policy's trunk: InstructGPT initialises it from the RM, so V starts out knowing what scores well,
        # and the policy's gradient never has to share a trunk with a regression target. Under LoRA its
        # cost is one more forward/backward through frozen weights — but not a second copy of them: both
        # adapters sit on the SFT checkpoint's base, which the two models then share.
        policy = with_lora(cfg, model_from_checkpoint(policy_init, device=cfg.device))
        critic = with_lora(cfg, model_from_checkpoint(value_init, scalar_head=True, device=cfg.device))
        trainer = cls(cfg, policy, critic, tok, round_, ptx)
        trainer.shared_base_bytes = share_frozen_weights(critic, policy)
        return trainer

    def push_state(self) -> dict[str, torch.Tensor]:
        """What a weight push carries: the LoRA adapters only when the policy has them (policy-inference
        holds the same base weights and applies them), else the whole state dict."""
        from chatrl.services.core.lora import adapter_state_dict, is_lora

        return adapter_state_dict(self.policy) if is_lora(self.policy) else self.policy.state_dict()

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, final: bool = False, metrics: dict | None = None) -> Checkpoint:
        name = "final" if final else f"iter-{self.iteration:05d}"
        opt = None if final else self.opt_p.state_dict()
        extra, vmeta = ({"value": self.critic.state_dict()} if self.critic is not None else {}), None
        if not final and self.opt_v is not None:  # the value optimizer too, flattened into tensors + metadata
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
        if self.critic is not None:
            self.critic.load_state_dict(ck.tensors("value", self.cfg.device))
        if (st := ck.optimizer_state()) is not None:
            self.opt_p.load_state_dict(st)
        meta = ck.manifest["meta"]
        if self.opt_v is not None and meta.get("value_optimizer") and ck.has("value_optimizer"):
            self.opt_v.load_state_dict(unflatten_optimizer(ck.tensors("value_optimizer"), meta["value_optimizer"]))
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.iteration = int(meta["iteration"])
        self.version = int(meta["policy_version"])
        ck.restore_rng()

    # --- the learning phases of one iteration --------------------------------------------------
    @torch.no_grad()
    def make_experience(self, b: ExperienceBatch) -> ExperienceBatch:
        """Fill in what the trainer computes from a rollout batch: π_old logprobs (recomputed by this
        policy, or the behaviour logprobs with ``old_logprobs: service``), the KL to the reference, and
        the advantages of ``ppo.algorithm``. PPO: values, per-token rewards (the clipped RM score at the
        last response token, −β·KL on every response token), GAE advantages (whitened if configured)
        and returns. Critic-free: the group baseline applied to the clipped scores, then the KL-shaped
        return to go (``kl_mode: reward``; with ``kl_mode: loss`` the shaped score alone), whitened over
        the batch for REINFORCE++. Also measures the logprob consistency gate (:attr:`gate`)."""
        pc, cfg = self.pc, self.cfg
        scores = algos.normalize_rewards(b.scores, 0.0).clamp(-pc.reward_clip, pc.reward_clip)
        self.policy.eval()
        same = (b.versions == self.version) if b.versions is not None else torch.zeros(len(b), dtype=torch.bool)
        recomputed = None
        if pc.old_logprobs == "recompute" or bool(same.any()):
            recomputed, _ = policy_forward(self.policy, b, cfg, pc.temperature)  # 0 off the response
        b.old_logprobs = recomputed if pc.old_logprobs == "recompute" else b.logprobs
        self.gate = self._logprob_gate(b, recomputed, same)
        if self.critic is not None:  # PPO
            self.critic.eval()
            b.values = value_forward(self.critic, b, cfg) * b.mask
            b.rewards, b.kl = algos.kl_penalized_rewards(b.old_logprobs, b.ref_logprobs, b.mask, scores,
                                                         self.kl_ctl.value, pc.kl_estimator)
            adv, b.returns = algos.gae(b.rewards, b.values, b.mask, pc.gamma, pc.lam)
            b.advantages = algos.masked_whiten(adv, b.mask) if pc.whiten_advantages else adv
            return b
        shaped = algos.group_advantages(scores, b.groups, pc.algorithm)  # [B]
        beta = self.kl_ctl.value if pc.kl_mode == "reward" else 0.0  # kl_mode loss: β·KL is in the loss
        b.rewards, _ = algos.kl_penalized_rewards(b.old_logprobs, b.ref_logprobs, b.mask, shaped, beta,
                                                  pc.kl_estimator)
        b.kl = algos.kl_per_token(b.old_logprobs, b.ref_logprobs, pc.kl_estimator) * b.mask
        adv = algos.returns_to_go(b.rewards, b.mask, pc.gamma)  # [B, L-1]
        b.advantages = algos.masked_whiten(adv, b.mask) if pc.algorithm == "reinforce_pp" else adv
        return b

    def _logprob_gate(self, b: ExperienceBatch, recomputed: torch.Tensor | None, same: torch.Tensor
                      ) -> dict[str, float]:
        """The gate over the rows sampled by this very version, against an fp32 forward (a bf16 trainer
        would otherwise read its own rounding, ~1e-3 nats, as a disagreement with an fp32 service)."""
        if not bool(same.any()):
            return algos.logprob_gate(b.logprobs, b.logprobs, b.mask, same)  # nothing comparable: 0 tokens
        if self.cfg.dtype != "fp32" or recomputed is None:
            rows = same.nonzero().squeeze(1)
            if self.pc.logprob_gate_rows > 0:
                rows = rows[: self.pc.logprob_gate_rows]
            sub = b.select(rows)
            fp32, _ = policy_forward(self.policy, sub, dataclasses.replace(self.cfg, dtype="fp32"), self.pc.temperature)
            return algos.logprob_gate(fp32, sub.logprobs, sub.mask, torch.ones(len(rows), dtype=torch.bool))
        return algos.logprob_gate(recomputed, b.logprobs, b.mask, same)

    def update(self, b: ExperienceBatch) -> dict[str, float]:
        """Epochs over minibatches of a made batch: clipped policy loss (+ β·KL with ``kl_mode: loss``,
        − entropy bonus, + PPO-ptx), then (PPO) the clipped value loss; then the KL controller sees this
        batch's KL. Returns the means of the per-minibatch statistics plus the batch's reward, KL, β and
        the logprob consistency gate."""
        pc, cfg = self.pc, self.cfg
        seq_kl = float((b.kl * b.mask).sum(dim=1).mean())  # KL per response, summed over its tokens
        logprob_gap = float(algos.masked_mean((b.old_logprobs - b.logprobs).abs(), b.mask))
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        n = len(b)
        stats: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "ppo", self.round, self.iteration, "minibatches"))
        for _epoch in range(pc.epochs):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, pc.minibatch_size):
                mb = b.select(perm[s: s + pc.minibatch_size])
                lp, ent = policy_forward(self.policy, mb, cfg, pc.temperature, entropy_grad=pc.entropy_coef != 0)
                pl, pst = algos.policy_loss(lp, mb.old_logprobs, mb.advantages, mb.mask, pc.clip_eps, pc.loss_norm)
                loss = pl
                if self.critic is None and pc.kl_mode == "loss":
                    kll = algos.kl_loss(lp, mb.ref_logprobs, mb.mask, pc.kl_estimator, pc.loss_norm)
                    loss = loss + self.kl_ctl.value * kll
                    stats.setdefault("kl_loss", []).append(float(kll.detach()))
                if pc.entropy_coef:
                    loss = loss - pc.entropy_coef * algos.masked_mean(ent, mb.mask)
                if self.ptx_tokens is not None:
                    ptx = self._ptx_loss(offset=self.iteration * 1000 + s)
                    loss = loss + ptx
                    stats.setdefault("ptx_loss", []).append(float(ptx.detach()) / pc.ptx_coef)
                self.opt_p.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), pc.grad_clip)
                self.opt_p.step()
                vst = {}
                if self.critic is not None:
                    v = value_forward(self.critic, mb, cfg)
                    vl, vst = algos.value_loss(v, mb.values, mb.returns, mb.mask, pc.value_clip)
                    self.opt_v.zero_grad(set_to_none=True)
                    vl.backward()
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), pc.grad_clip)
                    self.opt_v.step()
                    vst = {"value_loss": vl.item(), **vst}
                for k, val in {"policy_loss": pl.item(), "grad_norm": float(gn),
                               "entropy": float(algos.masked_mean(ent.detach(), mb.mask)), **pst, **vst}.items():
                    stats.setdefault(k, []).append(val)
        self.kl_ctl.update(seq_kl, n)
        self.iteration += 1
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        reward = float(b.scores.mean())
        out.update({"reward": reward, "kl": seq_kl, "beta": self.kl_ctl.value, "kl_target": pc.kl_target,
                    "logprob_gap": logprob_gap, "samples": float(n),
                    **{f"logprob_{k}": v for k, v in self.gate.items()},
                    "logprob_gate_threshold": pc.logprob_gate_threshold,
                    "kl_penalized_reward": reward - self.kl_ctl.value * seq_kl})
        return out

    def _ptx_loss(self, offset: int) -> torch.Tensor:
        """PPO-ptx: ``ptx_coef`` × the LM loss on a pre-training batch (InstructGPT eq. 2)."""
        from chatrl.services.trainer.stages.pretrain import random_windows

        pc, cfg = self.pc, self.cfg
        xb = random_windows(self.ptx_tokens, derive_seed(cfg.seed, "ppo-ptx", self.round, offset), pc.minibatch_size,
                      min(cfg.pretrain.seq_len, self.policy.cfg.max_seq_len - 1)).to(cfg.device)
        with autocast(cfg.dtype, cfg.device.split(":")[0]):
            logits = self.policy(xb[:, :-1]).logits
        return algos.ppo_ptx_loss(logits.float(), xb[:, 1:], coef=pc.ptx_coef)
