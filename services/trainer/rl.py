"""The RL loop — one implementation, used by the pipeline, ``StartRun(STAGE_PPO)``, the benchmark and the tests.

One iteration, in the order :meth:`RLLoop.iteration` runs it:

1. **generate** — the rollout source samples ``ppo.samples_per_prompt`` responses per prompt (a text, or a
   conversation rendered with the chat template) from the policy at the trainer's current version (token
   ids + behaviour logprobs);
2. **score** — the same source scores each response with the reward model and gets the reference
   model's logprobs of its tokens (both on the rollout side: workers ask the two services at once);
3. **make experience** — the trainer drops stale and empty samples, pads the rest into an
   :class:`~chatrl.services.trainer.experience.ExperienceBatch` and computes old logprobs, the KL and the
   advantages of ``ppo.algorithm`` — PPO's values and GAE, or a critic-free group baseline (GRPO, RLOO,
   REINFORCE++) — and the logprob consistency gate (:meth:`PPOTrainer.make_experience`);
4. **update** — clipped-ratio epochs over minibatches, the adaptive β (:meth:`PPOTrainer.update`);
5. **push** — the new weights go to the weight sink as version + 1.

Two named interfaces make the loop independent of where the models run:

- a :class:`RolloutSource` does phases 1–2: :class:`~chatrl.services.trainer.rollout.RayRollout` (Ray
  workers calling policy-inference, reward-scoring and reference-model over gRPC) or
  :class:`~chatrl.services.trainer.rollout.InProcessRollout` (the same models in this process, for tests);
- a :class:`WeightSink` receives phase 5: :class:`PolicyServiceSink` (``UpdateWeights`` to every
  policy-inference replica, with the metadata a replica with no model needs) or :class:`NullSink`.

With ``ppo.async_rollout`` the rollout of iteration i+1 is issued before the update of iteration i, so
generation overlaps training; its samples come from the policy one version behind, are kept only within
``ppo.max_staleness``, and PPO's ratio uses the behaviour logprobs they were sampled with. Checkpoints
every ``ppo.ckpt_every`` iterations and at the end; :meth:`RLLoop.run` resumes from the latest one.
This module imports neither gRPC nor Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from chatrl.services.core.checkpoint import latest_checkpoint
from chatrl.services.core.formats import Prompt
from chatrl.services.core.seeding import derive_seed
from chatrl.services.trainer.experience import Experience, make_batch
from chatrl.services.trainer.stages.common import Reporter
from chatrl.services.trainer.stages.ppo import PPOTrainer, stage_name


# --- the interfaces ---------------------------------------------------------------------------------
class PendingRollout(Protocol):
    def result(self) -> list[Experience]:
        """Wait for the samples (in prompt order, ``samples_per_prompt`` per prompt)."""


class RolloutSource(Protocol):
    """Phases 1–2 (generate, score). ``submit`` returns at once; the samples may still be in flight."""

    def submit(self, prompts: list[Prompt], version: int, seed: int) -> PendingRollout:
        """Sample from the policy serving ``version`` (or newer, within ``ppo.max_staleness``)."""

    def close(self) -> None: ...


class WeightSink(Protocol):
    """Phase 5: where the policy's new weights go."""

    def push(self, state_dict: dict, version: int) -> None: ...


class NullSink:
    """Keeps nothing but the versions pushed (tests, and an in-process source that samples from the
    trainer's own policy module, which needs no copy of the weights)."""

    def __init__(self) -> None:
        self.versions: list[int] = []

    def push(self, state_dict: dict, version: int) -> None:
        self.versions.append(version)


class PolicyServiceSink:
    """``UpdateWeights`` to policy-inference: ``target`` is a ``ReplicaGroup`` (every replica) or one
    ``PolicyClient``. ``metadata`` (the model config and tokenizer, the round) goes with every push, so a
    replica that joined mid-training — or started with no model — can load any push. A LoRA adapter push
    (only ``lora_A`` / ``lora_B`` keys) says so (``weights: adapter``) next to the base it applies to
    (``lora_base``, in ``metadata``): the replica checks it holds that base and keeps its base weights."""

    def __init__(self, target, metadata: dict[str, str] | None = None) -> None:
        self.target, self.metadata = target, dict(metadata or {})

    def push(self, state_dict: dict, version: int) -> None:
        from chatrl.services.core.lora import is_adapter_state

        meta = self.metadata
        if is_adapter_state(state_dict):
            if "lora_base" not in meta:
                raise ValueError("an adapter push needs metadata lora_base (the base weights it applies to)")
            meta = {**meta, "weights": "adapter"}
        self.target.update_weights(state_dict, version, metadata=meta)


Observe = Callable[[list[Experience]], dict[str, float]]  # extra metrics of a batch (e.g. the gold score)
# Brings restarted services back to the run's state before a rollout is tried again: (policy version,
# a function returning the policy's push state) → None. E.g. re-push the weights to a policy replica that
# came back empty, re-load the reference and reward models.
Heal = Callable[[int, Callable[[], dict]], None]


@dataclass
class RoundResult:
    checkpoint: Path  # the round's final checkpoint (policy + value model)
    version: int  # the policy version serving its weights
    history: list[dict] = field(default_factory=list)  # metrics per iteration run by this invocation


# --- the loop ---------------------------------------------------------------------------------------
class RLLoop:
    """One round of RL: ``trainer`` learns from what ``source`` samples on ``prompts`` and pushes to
    ``sink``. ``observe`` adds metrics computed from the raw samples."""

    def __init__(self, trainer: PPOTrainer, source: RolloutSource, sink: WeightSink, prompts: list[Prompt],
                 reporter: Reporter, observe: Observe | None = None, heal: Heal | None = None,
                 max_heals: int = 3) -> None:
        if not prompts:
            raise ValueError("the RL loop needs at least one prompt")
        self.trainer, self.source, self.sink, self.prompts = trainer, source, sink, list(prompts)
        self.reporter, self.observe = reporter, observe
        self.heal, self.max_heals = heal, max_heals  # a failed rollout: heal the services, sample again
        self.cfg, self.pc = trainer.cfg, trainer.pc
        self.name = stage_name(trainer.round)
        self.overlap = self.pc.async_rollout
        self._pending: tuple[int, PendingRollout] | None = None  # (iteration, rollout) issued ahead

    def run(self, start_version: int) -> RoundResult:
        """Run (or resume) the round's ``ppo.iterations``. ``start_version`` is the policy-inference
        version serving the trainer's initial weights; each push is one version newer."""
        tr, pc, rep = self.trainer, self.pc, self.reporter
        done = latest_checkpoint(tr.root)
        if done is not None and done.manifest["meta"].get("final"):
            rep.log(f"{self.name}: already finished ({done.path})")
            return RoundResult(done.path, int(done.manifest["meta"]["policy_version"]))
        tr.version = start_version
        if done is not None:
            tr.restore(done)
            rep.log(f"{self.name}: resuming after iteration {tr.iteration}")
            tr.version = max(tr.version, start_version) + 1
            self.sink.push(tr.push_state(), tr.version)  # the policy service serves the restored weights
        if self.overlap:
            rep.log(f"{self.name}: async_rollout: the next rollout overlaps each update (ppo.old_logprobs=service)")
        history: list[dict] = []
        rep.start(self.name, pc.iterations, tr.iteration)
        t0 = time.perf_counter()
        while tr.iteration < pc.iterations:
            rep.check_cancelled()
            metrics = self.iteration(issue_next=tr.iteration + 1 < pc.iterations)
            history.append({"iteration": tr.iteration, **metrics})
            rep.progress(self.name, tr.iteration, pc.iterations)
            rep.metrics(self.name, tr.iteration, pc.iterations, metrics)
            if tr.iteration % pc.ckpt_every == 0 or tr.iteration == pc.iterations:
                tr.save(metrics=metrics)
        rep.finish(self.name)
        ck = tr.save(final=True, metrics={"seconds": time.perf_counter() - t0, **(history[-1] if history else {})})
        return RoundResult(ck.path, tr.version, history)

    def iteration(self, issue_next: bool = True) -> dict[str, float]:
        """One iteration: generate → score → make experience → update → push. With overlap, the next
        iteration's rollout is issued before this update (unless ``issue_next`` is false: the last one)."""
        tr, pc = self.trainer, self.pc
        it = tr.iteration
        t_roll = time.perf_counter()
        # 1-2. generate + score: sampled (or already in flight) from the policy at tr.version
        pending = self._pending[1] if self._pending and self._pending[0] == it else self._submit(it)
        self._pending = None
        heals = 0
        while True:
            try:
                exps = pending.result()
                break
            except Exception as e:  # a service died under the rollout (its clients' retries ran out)
                if self.heal is None or heals >= self.max_heals:
                    raise
                heals += 1
                self.reporter.log(f"{self.name}: rollout of iteration {it + 1} failed ({type(e).__name__}: "
                                  f"{str(e)[:200]}); bringing the services back and sampling it again")
                self.heal(tr.version, tr.push_state)
                pending = self._submit(it)  # the same prompts and seeds: nothing lost, nothing twice
        if self.overlap and issue_next:  # sampled from this version while the update below runs
            self._pending = (it + 1, self._submit(it + 1))
        t_upd = time.perf_counter()
        # 3. make experience: keep samples within the staleness bound and with a response
        stale = [e for e in exps if tr.version - e.version > pc.max_staleness]
        fresh = [e for e in exps if tr.version - e.version <= pc.max_staleness and e.response_ids]
        if not fresh:
            raise RuntimeError("no experience to learn from (every response was empty or stale)")
        batch = tr.make_experience(make_batch(fresh, tr.tok.pad_id))
        # 4. update
        metrics = tr.update(batch)
        if metrics.get("logprob_gate_max", 0.0) > pc.logprob_gate_threshold:
            self.reporter.log(f"{self.name}: logprob gate {metrics['logprob_gate_max']:.3g} nats > "
                              f"ppo.logprob_gate_threshold {pc.logprob_gate_threshold:g}: policy-inference and the "
                              f"trainer disagree on the same weights")
        metrics.update({"response_len": float(np.mean([len(e.response_ids) for e in fresh])),
                        "finished": float(np.mean([e.finished for e in fresh]))})
        if self.observe is not None:
            metrics.update(self.observe(fresh))
        # 5. push
        t_push = time.perf_counter()
        tr.version += 1
        state = tr.push_state()  # the adapters only, for a LoRA policy
        self.sink.push(state, tr.version)
        metrics.update({"rollout_s": t_upd - t_roll, "update_s": t_push - t_upd, "push_s": time.perf_counter() - t_push,
                        "push_bytes": float(sum(t.numel() * t.element_size() for t in state.values())),
                        "samples_per_s": len(exps) / max(1e-9, t_upd - t_roll), "dropped_stale": float(len(stale)),
                        "samples": float(len(exps)), "degraded": float(heals),  # > 0: the iteration had to heal the services first
                        "policy_version": float(tr.version)})
        return metrics

    def _submit(self, it: int) -> PendingRollout:
        """The rollout of iteration ``it``: ``ppo.prompts_per_iteration`` prompts drawn without replacement,
        the same for the same (seed, round, iteration) — a resumed run samples what it would have."""
        cfg, r = self.cfg, self.trainer.round
        rng = np.random.default_rng(derive_seed(cfg.seed, "ppo", r, it, "prompts"))
        pick = rng.choice(len(self.prompts), size=min(self.pc.prompts_per_iteration, len(self.prompts)), replace=False)
        return self.source.submit([self.prompts[i] for i in pick], self.trainer.version,
                                  derive_seed(cfg.seed, "ppo", r, it, "rollout"))
