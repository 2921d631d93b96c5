"""The whole InstructGPT loop, run the way it runs on a cluster:

    pre-train → SFT → (round r: CreateComparisonTasks from the *current* policy → labels through the
    feedback service → reward model r → reward-scoring loads it → PPO against it, rollouts by Ray
    workers through the services, weights pushed to policy-inference after every iteration) × R

In the embedded default the labels come from the *simulated labelers* (a noisy gold preference
function standing in for people), which label through the feedback service's public API exactly as a
person would (NextTask → SubmitRanking). With ``pipeline.labelers: 0`` the pipeline waits for people to
rank the open tasks instead. Evaluation scores held-out prompts with the gold function, which the
reward model never sees; the report (Markdown + PNG plots) lands in ``<run_dir>/report/``.

The pipeline is given the services' :class:`Endpoints` and never starts a process: whoever starts it (the
trainer service, the ``chatrl`` command) decides whether to launch local services
(:func:`chatrl.services.trainer.runs.run_endpoints`). It seeds empty services itself: reference-model
``LoadModel`` of the SFT checkpoint, policy-inference ``UpdateWeights`` of the SFT weights, reward-scoring
``LoadModel`` of each round's reward model. :func:`run_ppo_stage` is one PPO round on its own (what
``StartRun(STAGE_PPO)`` runs); both run the one RL loop of :mod:`chatrl.services.trainer.rl`.

Every stage checkpoints; rerunning the pipeline on the same run directory resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatrl.services.core.checkpoint import atomic_write_text, load_checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import load_prompts, load_rankings
from chatrl.services.trainer import labels
from chatrl.services.trainer.report import BASE_LABEL
from chatrl.services.trainer.rl import PolicyServiceSink, RLLoop, RoundResult
from chatrl.services.trainer.rollout import Endpoints, RayRollout
from chatrl.services.trainer.stages import dpo, ppo, pretrain, reward_model, sft
from chatrl.services.trainer.stages.common import (
    Reporter,
    previous_stage,
    run_dir,
    stage_dir,
    stage_done,
    write_json,
)
from chatrl.services.trainer.stages.data import resolve_data

__all__ = ["Endpoints", "run_pipeline", "run_ppo_stage"]

log = logging.getLogger("chatrl.pipeline")


@dataclass
class Services:
    """Clients of the services a run talks to. The model services are
    :class:`~chatrl.clients.lib.ReplicaGroup` s: weights and models go to every replica."""

    policy: object
    reward: object
    reference: object
    feedback: object | None
    endpoints: Endpoints

    def close(self) -> None:
        for c in (self.policy, self.reward, self.reference, self.feedback):
            if c is not None:
                c.close()


def connect(endpoints: Endpoints) -> Services:
    from chatrl.clients.lib import FeedbackClient, PolicyClient, ReferenceClient, ReplicaGroup, RewardClient

    unknown = set(endpoints.replica_hosts) - {"policy", "reward", "reference"}
    if unknown:
        raise ValueError(f"pipeline.replica_hosts: unknown service(s) {sorted(unknown)} (policy, reward, reference)")
    kw = {"token": endpoints.token, "timeout": 600.0, "retries": 8}
    return Services(ReplicaGroup(PolicyClient, endpoints.replicas("policy"), **kw),
                    ReplicaGroup(RewardClient, endpoints.replicas("reward"), **kw),
                    ReplicaGroup(ReferenceClient, endpoints.replicas("reference"), **kw),
                    FeedbackClient(endpoints.feedback, **kw) if endpoints.feedback else None, endpoints)


def policy_metadata(ckpt: Path) -> dict[str, str]:
    """What a policy-inference replica with no model needs besides the weights (sent with every push, so a
    replica that joined mid-training can start from any push)."""
    ck = load_checkpoint(ckpt)
    meta = {"config_json": json.dumps(ck.manifest["model_config"]),
            "tokenizer_json": (Path(ck.path) / "tokenizer.json").read_text()}
    if ck.manifest["model_config"].get("lora"):  # pushes carry only the adapters, applied to this base
        meta["lora_base"] = ck.sha256
    return meta


def seed_models(svc: Services, sft_ckpt: Path, reporter: Reporter) -> bool:
    """Load the SFT checkpoint into reference-model replicas that have none (the path must be visible to them,
    e.g. a shared volume) and push the SFT weights to policy-inference replicas that have none. Returns
    whether it pushed (then every replica serves the SFT weights as the newest version)."""
    svc.reference.wait_health_known(120)
    if 0 in svc.reference.model_versions().values():
        svc.reference.load_model(str(sft_ckpt), sha256=load_checkpoint(sft_ckpt).sha256)
        reporter.log(f"reference-model: loaded {sft_ckpt}")
    svc.policy.wait_health_known(120)
    versions = svc.policy.model_versions()
    if 0 not in versions.values():
        return False
    ver = max(versions.values()) + 1  # every replica must be able to take it
    # one-off: labels and the reward model come before the next push (of the adapters only, in a LoRA run),
    # so the trainer keeps no packed copy of the full weights (0.66 GB for SmolLM2-135M) through them
    svc.policy.update_weights(load_checkpoint(sft_ckpt).model_state(), ver, metadata=policy_metadata(sft_ckpt),
                              keep_buffer=False)
    reporter.log(f"policy-inference: pushed the SFT weights as version {ver} to {len(versions)} replica(s)")
    return True


def serve_reward_model(svc: Services, rm_ckpt: Path, reporter: Reporter) -> None:
    svc.reward.wait_health_known(120)
    svc.reward.load_model(str(rm_ckpt), sha256=load_checkpoint(rm_ckpt).sha256)
    svc.reward.wait_serving(60)
    reporter.log(f"reward-scoring: loaded {rm_ckpt}")


def gold_observer(gold):
    """The RL loop's extra metric: the gold (simulated labeler) score of the training samples."""
    if gold is None:
        return None
    return lambda exps: {"gold_train": float(np.mean([gold.score(e.prompt, e.text, e.finished) for e in exps]))}


def heal_policy_replicas(policy, version: int, push_state, full_state, metadata: dict[str, str]) -> int:
    """Bring every policy replica behind ``version`` to it; returns how many needed it. A replica that holds
    a model gets the push state (the adapters only, for a LoRA policy); one that came back empty (version 0)
    has no base to apply adapters to, so it gets the full weights (``full_state()``: the base + the current
    adapters) as that version — with ``lora_base`` in ``metadata`` it takes adapter pushes after that."""
    from chatrl.services.core.lora import is_adapter_state

    clients = policy.clients()
    behind = {a: v for a, v in policy.model_versions().items() if v < version}
    for a, v in behind.items():  # only those: a replica already serving `version` refuses it again
        state = push_state()
        if v == 0 and is_adapter_state(state):
            state = full_state()
        PolicyServiceSink(clients[a], metadata).push(state, version)
    return len(behind)


def labelled_at(snapshot: Path) -> list[float]:
    """When each ranking of a round's snapshot was submitted (epoch seconds): the rows the feedback service
    exports carry ``created_at``; rankings from a user's file may not (then none)."""
    from datetime import datetime

    out = []
    if snapshot.exists():
        with open(snapshot, encoding="utf-8") as f:  # lines end at "\n" only: texts may hold U+2028 and kin
            for line in f:
                stamp = json.loads(line).get("created_at") if line.strip() else None
                if isinstance(stamp, str):
                    out.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return out


class LabelLatencySink:
    """A weight sink that, at its first push, measures label-to-policy latency: from each ranking's
    submission to the first policy version trained against a reward model that used it (the first push
    of the round whose reward model was fitted on those rankings). Reported as round metrics
    ``label_to_policy_s_median`` / ``_max`` (``chatrl_trainer_metric`` on /metrics) and kept in
    :attr:`latency` for the run report."""

    def __init__(self, sink: PolicyServiceSink, labelled: list[float], reporter: Reporter, stage: str,
                 clock=time.time, on_measured=None) -> None:
        self.sink, self.labelled, self.reporter, self.stage, self.clock = sink, labelled, reporter, stage, clock
        self.on_measured = on_measured  # called with the figures at once (the pipeline persists them)
        self.latency: dict[str, float] | None = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.sink.metadata

    def push(self, state_dict: dict, version: int) -> None:
        self.sink.push(state_dict, version)
        if self.latency is None and self.labelled:
            lat = np.maximum(0.0, self.clock() - np.asarray(self.labelled))
            self.latency = {"label_to_policy_s_median": float(np.median(lat)),
                            "label_to_policy_s_max": float(lat.max()), "labels": float(len(lat))}
            self.reporter.metrics(self.stage, 0, 0, self.latency)
            if self.on_measured is not None:
                self.on_measured(self.latency)


def ppo_round(cfg: RunConfig, reporter: Reporter, svc: Services, source: RayRollout, round_: int,
              policy_ckpt: Path, rm_ckpt: Path, version: int, prompts: list[str], push_meta: dict[str, str],
              gold, reference_ckpt: Path | None = None, labelled: list[float] | None = None,
              on_latency=None) -> RoundResult:
    """One PPO round through the services: the RL loop from ``policy_ckpt`` (served as ``version``) with
    the value model from ``rm_ckpt``, pushes to every policy replica. A rollout that fails because a service
    died is sampled again once the restarted services are healed: the reference model (``reference_ckpt``,
    the SFT checkpoint) and the reward model re-loaded, the current weights re-pushed to a policy replica
    behind the trainer's version (:func:`heal_policy_replicas`: the full weights to an empty one, also with
    LoRA). ``labelled``: when the round's fresh rankings were submitted; the label-to-policy latency is
    measured at the round's first push (:class:`LabelLatencySink`) and handed to ``on_latency``."""
    trainer = ppo.PPOTrainer.from_checkpoints(cfg, load_checkpoint(policy_ckpt), load_checkpoint(rm_ckpt), round_)
    if trainer.shared_base_bytes:
        reporter.log(f"the value model shares {trainer.shared_base_bytes / 2**20:.2f} MiB of frozen base weights "
                     f"with the policy (one copy, not two)")
    sink = LabelLatencySink(PolicyServiceSink(svc.policy, {**push_meta, "round": str(round_)}), labelled or [],
                            reporter, round_stage(cfg, round_)[0], on_measured=on_latency)

    def heal(version: int, push_state) -> None:
        """After a service died and was restarted (empty): the reference and reward models loaded again,
        the policy's current weights pushed to every replica behind ``version``."""
        svc.reference.wait_health_known(600)
        if reference_ckpt is not None and 0 in svc.reference.model_versions().values():
            svc.reference.load_model(str(reference_ckpt), sha256=load_checkpoint(reference_ckpt).sha256)
        svc.reward.wait_health_known(600)
        if 0 in svc.reward.model_versions().values():
            serve_reward_model(svc, rm_ckpt, reporter)
        svc.policy.wait_health_known(600)
        n = heal_policy_replicas(svc.policy, version, push_state, trainer.policy.state_dict, sink.metadata)
        if n:
            reporter.log(f"policy-inference: pushed version {version} again to {n} replica(s) behind it")

    return RLLoop(trainer, source, sink, prompts, reporter, observe=gold_observer(gold), heal=heal).run(version)


METHOD_LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++", "dpo": "DPO"}


def rm_rankings(cfg: RunConfig, r: int, fresh: list) -> list:
    """Round ``r``'s reward-model data: with ``reward.train_on: all`` every earlier round's snapshot (each
    ranked samples of that round's policy) plus ``fresh``; with ``latest`` only ``fresh``."""
    if cfg.reward.train_on == "latest":
        return fresh
    earlier = [run_dir(cfg) / "data" / f"rankings_r{i}.jsonl" for i in range(r)]
    return [rk for path in earlier if path.exists() for rk in load_rankings(path)] + list(fresh)


def round_stage(cfg: RunConfig, r: int) -> tuple[str, str]:
    """(checkpoint stage, report label) of round ``r``: the RL round (whatever ``ppo.algorithm``) or DPO."""
    if cfg.pipeline.method == "dpo":
        return dpo.stage_name(r), f"DPO round {r}"
    return ppo.stage_name(r), f"{METHOD_LABELS[cfg.ppo.algorithm]} round {r}"


def dpo_round(cfg: RunConfig, reporter: Reporter, svc: Services, round_: int, policy_ckpt: Path, rankings,
              version: int, push_meta: dict[str, str]) -> RoundResult:
    """One DPO round (``pipeline.method: dpo``): DPO of ``policy_ckpt`` on this round's rankings against the
    reference-model service (the SFT model), then the new weights go to every policy replica as one version."""
    from chatrl.clients.lib import ReferenceClient

    ep = svc.endpoints  # a data-plane call: the service's address (ready replicas), not the replica group
    ref = ReferenceClient(ep.reference, token=ep.token, timeout=600.0, retries=8)
    try:
        res = dpo.run(cfg, reporter, str(policy_ckpt), rankings, dpo.service_reference(ref), round_)
    finally:
        ref.close()
    version += 1
    svc.policy.update_weights(load_checkpoint(res.checkpoint).model_state(), version,
                              metadata={**push_meta, "round": str(round_)}, keep_buffer=False)
    return RoundResult(res.checkpoint, version, [{"iteration": 1, **res.metrics, "policy_version": float(version)}])


def run_ppo_stage(cfg: RunConfig, reporter: Reporter, endpoints: Endpoints) -> RoundResult:
    """``StartRun(STAGE_PPO)``: one PPO round (``ppo_r0``) from ``ppo.policy_init`` (an SFT checkpoint; default
    this run's ``sft`` stage) against the reward model ``ppo.reward_model`` (default this run's ``reward``
    stage), through the services at ``endpoints`` — seeded here with the SFT weights and the reward model."""
    from chatrl.services.core.gold import GoldLabeler

    sft_ck = previous_stage(cfg, "sft", cfg.ppo.policy_init or None)
    rm_ck = previous_stage(cfg, "reward", cfg.ppo.reward_model or None)
    data = resolve_data(cfg)
    prompts = load_prompts(data.prompts)
    gold = GoldLabeler.load(data.gold) if data.gold else None
    svc = connect(endpoints)
    source = None
    try:
        push_meta = policy_metadata(sft_ck.path)
        if not seed_models(svc, sft_ck.path, reporter):  # the service serves something else: serve the SFT
            ver = max(svc.policy.model_versions().values()) + 1
            svc.policy.update_weights(sft_ck.model_state(), ver, metadata=push_meta, keep_buffer=False)
        serve_reward_model(svc, rm_ck.path, reporter)
        version = max(svc.policy.model_versions().values())
        t = time.perf_counter()
        source = RayRollout(endpoints, cfg.ppo)
        reporter.log(f"{cfg.ppo.num_workers} Ray rollout workers up in {time.perf_counter() - t:.1f}s")
        res = ppo_round(cfg, reporter, svc, source, 0, sft_ck.path, rm_ck.path, version, prompts, push_meta, gold,
                        reference_ckpt=sft_ck.path)
        atomic_write_text(stage_dir(cfg, "policy") / "LATEST", f"../{ppo.stage_name(0)}/final\n")
        return res
    finally:
        if source is not None:
            source.close()
        svc.close()


def reuse(src: Path, dst: Path, reporter: Reporter) -> None:
    """Start from another run's pre-training, SFT, round-0 labels and reward model (ablations: the same
    starting point, only PPO differs). Copies are made once; existing files are kept. The tokenizer and token
    cache of chatrl's own pre-training come along when there are any (an imported HF model has neither)."""
    import shutil

    needed = ("data/rankings_r0.jsonl", "checkpoints/pretrain", "checkpoints/sft", "checkpoints/reward_r0")
    for rel in ("tokenizer.json", "data/pretrain_tokens.npy", *needed):
        s, d = src / rel, dst / rel
        if not s.exists() and rel in needed:
            raise FileNotFoundError(f"pipeline.reuse_from: {s} does not exist (run that pipeline first)")
        if d.exists() or not s.exists():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)
    reporter.log(f"reusing pre-training, SFT and round-0 reward model from {src}")


def run_pipeline(cfg: RunConfig, reporter: Reporter | None, endpoints: Endpoints) -> dict:
    """Pre-train → SFT → R rounds (labels → RM → PPO) → held-out evaluation → report, through the services
    at ``endpoints`` (feedback included). Returns the report path, the final policy and the run state."""
    from chatrl.services.core.gold import GoldLabeler
    from chatrl.services.trainer.evaluate import evaluate_stage
    from chatrl.services.trainer.report import write_report

    reporter = reporter or Reporter()
    if not endpoints.feedback:
        raise ValueError("the pipeline needs the feedback service's address (Endpoints.feedback)")
    t_start = time.perf_counter()
    cfg_file = run_dir(cfg) / "config.yaml"
    if not cfg_file.exists():  # what `chatrl pipeline resume RUN_DIR` restarts from
        import yaml

        atomic_write_text(cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    state_file = run_dir(cfg) / "pipeline.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"evals": {}, "history": {}, "times": {}}
    times = state["times"]
    data = resolve_data(cfg)
    gold = GoldLabeler.load(data.gold) if data.gold else None

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        if name not in times:
            times[name] = time.perf_counter() - t
        return r

    if cfg.pipeline.reuse_from:
        reuse(Path(cfg.pipeline.reuse_from), run_dir(cfg), reporter)
    timed("pretrain", pretrain.run, cfg, reporter)
    sft_res = timed("sft", sft.run, cfg, reporter)
    prompts = load_prompts(data.prompts)
    eval_prompts = load_prompts(data.eval_prompts)[: cfg.pipeline.eval_prompts]
    source = None
    svc = connect(endpoints)
    try:
        seed_models(svc, sft_res.checkpoint, reporter)
        t = time.perf_counter()
        if cfg.pipeline.method == "rl":  # DPO samples nothing itself (the feedback service samples the tasks)
            source = RayRollout(endpoints, cfg.ppo)
            reporter.log(f"{cfg.ppo.num_workers} Ray rollout workers up in {time.perf_counter() - t:.1f}s")
        policy_ckpt = sft_res.checkpoint
        version = max(svc.policy.model_versions().values())
        push_meta = policy_metadata(sft_res.checkpoint)
        pushed = False  # whether this invocation has put a PPO policy on policy-inference yet
        for r in range(cfg.pipeline.rounds):
            name, _ = round_stage(cfg, r)
            done = stage_done(stage_dir(cfg, name))
            if done is not None:
                policy_ckpt = done.path
                continue
            if policy_ckpt != sft_res.checkpoint and not pushed:  # resumed: serve the latest policy again
                version += 1
                svc.policy.update_weights(load_checkpoint(policy_ckpt).model_state(), version,
                                          metadata={**push_meta, "round": str(r)}, keep_buffer=False)
                pushed = True
            snapshot = run_dir(cfg) / "data" / f"rankings_r{r}.jsonl"
            rankings = timed(f"labels_r{r}", labels.collect_rankings, cfg, labels.ServiceLabels(svc.feedback),
                             prompts, gold, f"r{r}", snapshot, reporter)
            if cfg.pipeline.method == "dpo":  # the rankings train the policy directly: no reward model, no RL
                res = timed(name, dpo_round, cfg, reporter, svc, r, policy_ckpt, rankings, version, push_meta)
            else:
                rm = timed(f"reward_r{r}", reward_model.run, cfg, reporter, init=str(sft_res.checkpoint),
                           rankings=rm_rankings(cfg, r, rankings), stage=f"reward_r{r}")
                serve_reward_model(svc, rm.checkpoint, reporter)
                def measured(figures: dict, name=name) -> None:  # persisted at once: a resumed round keeps it
                    state.setdefault("label_to_policy", {})[name] = figures
                    write_json(state_file, state)

                known = state.get("label_to_policy", {}).get(name)  # measured before an interruption
                res = timed(name, ppo_round, cfg, reporter, svc, source, r, policy_ckpt, rm.checkpoint, version,
                            prompts, push_meta, gold, reference_ckpt=sft_res.checkpoint,
                            labelled=[] if known else labelled_at(snapshot), on_latency=measured)
            state["history"][name] = res.history or state["history"].get(name, [])
            policy_ckpt, version, pushed = res.checkpoint, res.version, True
            write_json(state_file, state)
            # checkpoints/policy always points at the newest policy (what `chatrl up` serves)
            atomic_write_text(stage_dir(cfg, "policy") / "LATEST", f"../{name}/final\n")
    finally:
        if source is not None:
            source.close()
        svc.close()
    # evaluation on held-out prompts (gold never seen by any RM), with the last RM's score and KL to SFT
    if gold is not None:
        last_rm = stage_done(stage_dir(cfg, f"reward_r{cfg.pipeline.rounds - 1}"))
        stages = [(BASE_LABEL, "pretrain"), ("SFT", "sft")] + [
            round_stage(cfg, r)[::-1] for r in range(cfg.pipeline.rounds)]
        for label, st in stages:
            if label in state["evals"]:
                continue
            ck = stage_done(stage_dir(cfg, st))
            state["evals"][label] = evaluate_stage(cfg, ck, sft_res.checkpoint, last_rm.path if last_rm else None,
                                                   eval_prompts, gold)
            reporter.log(f"eval {label}: gold {state['evals'][label]['gold']:+.3f}")
    times["total"] = times.get("total", 0.0) + time.perf_counter() - t_start  # over every invocation (resumes)
    state["times"] = times
    write_json(state_file, state)
    report = write_report(cfg, state)
    return {"report": str(report), "policy": str(Path(policy_ckpt).resolve()), **state}
