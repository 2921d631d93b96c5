"""The whole InstructGPT loop, run the way it runs on a cluster:

    pre-train → SFT → (round r: CreateComparisonTasks from the *current* policy → labels through the
    feedback service → reward model r → reward-scoring loads it → PPO against it, rollouts by Ray
    workers through the services, weights pushed to policy-inference after every iteration) × R

In the embedded default the labels come from the *simulated labelers* (a noisy gold preference
function standing in for people), which label through the feedback service's public API exactly as a
person would (NextTask → SubmitRanking). With ``pipeline.labelers: 0`` the pipeline waits for people to
rank the open tasks instead. Evaluation scores held-out prompts with the gold function, which the
reward model never sees; the report (Markdown + PNG plots) lands in ``<run_dir>/report/``.

Every stage checkpoints; rerunning the pipeline on the same run directory resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatrl.services.core.checkpoint import atomic_write_text, load_checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import load_prompts
from chatrl.services.trainer import labels
from chatrl.services.trainer.stages import ppo, pretrain, reward_model, sft
from chatrl.services.trainer.stages.common import Reporter, run_dir, stage_dir, stage_done, write_json
from chatrl.services.trainer.stages.data import resolve_data

log = logging.getLogger("chatrl.pipeline")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (each socket stays bound until all are picked, so no port is
    handed out twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Services:
    """Clients of the services the pipeline talks to (and the local processes, if it started them). The
    model services are :class:`~chatrl.clients.lib.ReplicaGroup` s: weights and models go to every replica."""

    policy: object
    reward: object
    reference: object
    feedback: object
    addresses: dict[str, str]
    cluster: object | None = None

    def close(self) -> None:
        for c in (self.policy, self.reward, self.reference, self.feedback):
            c.close()
        if self.cluster is not None:
            self.cluster.stop()


def start_services(cfg: RunConfig, sft_ckpt: Path, reporter: Reporter) -> Services:
    from chatrl.clients.lib import FeedbackClient, PolicyClient, ReferenceClient, ReplicaGroup, RewardClient
    from chatrl.clients.up import LocalCluster

    pc = cfg.pipeline
    names = ["policy", "reward", "reference", "feedback"]
    rd = run_dir(cfg).resolve()
    if pc.start_services:
        ports = dict(zip(names, free_ports(len(names))))
        over = [f"{n}.port={ports[n]}" for n in names] + [f"{n}.metrics_port=-1" for n in names] + [
            f"policy.checkpoint={sft_ckpt}", f"reference.checkpoint={sft_ckpt}", "reward.checkpoint=''",
            f"feedback.db={rd / 'feedback.db'}", f"feedback.policy_address=127.0.0.1:{ports['policy']}",
            "feedback.web_port=-1",
            f"policy.device={cfg.device}", f"reward.device={cfg.device}", f"reference.device={cfg.device}"]
        over += list(pc.service_overrides)
        cluster = LocalCluster(pc.services, over, only=names, log_dir=rd / "logs")
        t0 = time.perf_counter()
        reporter.log(f"starting services {names} …")
        # reward-scoring has nothing to serve until the first reward model exists: wait on the others
        cluster.start(120, wait_for=["policy", "reference", "feedback"])
        reporter.log(f"services up in {time.perf_counter() - t0:.1f}s: "
                     + ", ".join(f"{n} {cluster.address(n)}" for n in names))
        addrs = {n: cluster.address(n) for n in names}
    else:
        from chatrl.services.runtime.config import load_services_config

        secs = load_services_config(pc.services, list(pc.service_overrides))
        addrs = {n: f"{secs[n].get('host', '127.0.0.1')}:{secs[n]['port']}" for n in names}
        cluster = None
    kw = {"timeout": 600.0, "retries": 8}

    def replicas(name: str, cls: type) -> ReplicaGroup:
        host = pc.replica_hosts.get(name)
        return ReplicaGroup(cls, f"{host}:{addrs[name].rpartition(':')[2]}" if host else addrs[name], **kw)

    unknown = set(pc.replica_hosts) - {"policy", "reward", "reference"}
    if unknown:
        raise ValueError(f"pipeline.replica_hosts: unknown service(s) {sorted(unknown)} (policy, reward, reference)")
    svc = Services(replicas("policy", PolicyClient), replicas("reward", RewardClient),
                   replicas("reference", ReferenceClient), FeedbackClient(addrs["feedback"], **kw), addrs, cluster)
    if not pc.start_services:  # services deployed elsewhere (k8s): give empty ones their SFT model
        seed_models(svc, sft_ckpt, reporter)
    return svc


def policy_metadata(ckpt: Path) -> dict[str, str]:
    """What a policy-inference replica with no model needs besides the weights (sent with every push, so a
    replica that joined mid-training can start from any push)."""
    ck = load_checkpoint(ckpt)
    return {"config_json": json.dumps(ck.manifest["model_config"]),
            "tokenizer_json": (Path(ck.path) / "tokenizer.json").read_text()}


def seed_models(svc: Services, sft_ckpt: Path, reporter: Reporter) -> None:
    """Load the SFT checkpoint into reference-model replicas that have none (the path must be visible to them,
    e.g. a shared volume) and push the SFT weights to policy-inference replicas that have none."""
    svc.reference.wait_health_known(120)
    if 0 in svc.reference.model_versions().values():
        svc.reference.load_model(str(sft_ckpt))
        reporter.log(f"reference-model: loaded {sft_ckpt}")
    svc.policy.wait_health_known(120)
    versions = svc.policy.model_versions()
    if 0 in versions.values():
        ver = max(versions.values()) + 1  # every replica must be able to take it
        svc.policy.update_weights(load_checkpoint(sft_ckpt).model_state(), ver, metadata=policy_metadata(sft_ckpt))
        reporter.log(f"policy-inference: pushed the SFT weights as version {ver} to {len(versions)} replica(s)")


def reuse(src: Path, dst: Path, reporter: Reporter) -> None:
    """Start from another run's pre-training, SFT, round-0 labels and reward model (ablations: the same
    starting point, only PPO differs). Copies are made once; existing files are kept."""
    import shutil

    for rel in ("tokenizer.json", "data/pretrain_tokens.npy", "data/rankings_r0.jsonl", "checkpoints/pretrain",
                "checkpoints/sft", "checkpoints/reward_r0"):
        s, d = src / rel, dst / rel
        if not s.exists():
            raise FileNotFoundError(f"pipeline.reuse_from: {s} does not exist (run that pipeline first)")
        if d.exists():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, d)
    reporter.log(f"reusing pre-training, SFT and round-0 reward model from {src}")


def run_pipeline(cfg: RunConfig, reporter: Reporter | None = None) -> dict:
    from chatrl.services.core.gold import GoldLabeler
    from chatrl.services.trainer.evaluate import evaluate_stage
    from chatrl.services.trainer.report import write_report

    reporter = reporter or Reporter()
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
    pool = None
    svc = start_services(cfg, sft_res.checkpoint, reporter)
    try:
        from chatrl.services.trainer.rollout import Endpoints, RolloutPool

        t = time.perf_counter()
        pool = RolloutPool(Endpoints(svc.addresses["policy"], svc.addresses["reward"], svc.addresses["reference"]),
                           cfg.ppo.num_workers, cfg.ppo.worker_num_cpus, cfg.ppo.worker_num_gpus)
        reporter.log(f"{cfg.ppo.num_workers} Ray rollout workers up in {time.perf_counter() - t:.1f}s")
        policy_ckpt = sft_res.checkpoint
        version = max(svc.policy.model_versions().values())
        push_meta = policy_metadata(sft_res.checkpoint)
        pc = cfg.ppo
        current = {"round": 0}
        pushed = False  # whether this invocation has put a PPO policy on policy-inference yet

        def submit(ps: list[str], ver: int, seed: int):
            return pool.submit(ps, pc.samples_per_prompt, pc.max_new_tokens, pc.temperature, seed,
                               expected_version=0 if pc.max_staleness else ver).result

        def push(state_dict: dict, ver: int) -> None:
            svc.policy.update_weights(state_dict, ver, metadata={**push_meta, "round": str(current["round"])})

        def observe(exps: list) -> dict[str, float]:
            if gold is None:
                return {}
            return {"gold_train": float(np.mean([gold.score(e.prompt, e.text, e.finished) for e in exps]))}

        for r in range(cfg.pipeline.rounds):
            current["round"] = r
            name = ppo.stage_name(r)
            done = stage_done(stage_dir(cfg, name))
            if done is not None:
                policy_ckpt = done.path
                continue
            if policy_ckpt != sft_res.checkpoint and not pushed:  # resumed: serve the latest policy again
                version += 1
                push(load_checkpoint(policy_ckpt).model_state(), version)
                pushed = True
            rankings = timed(f"labels_r{r}", labels.collect_rankings, cfg, labels.ServiceLabels(svc.feedback),
                             prompts, gold, f"r{r}", run_dir(cfg) / "data" / f"rankings_r{r}.jsonl", reporter)
            rm = timed(f"reward_r{r}", reward_model.run, cfg, reporter, init=str(sft_res.checkpoint),
                       rankings=rankings, stage=f"reward_r{r}")
            svc.reward.load_model(str(rm.checkpoint))
            svc.reward.wait_serving(60)
            res = timed(name, ppo.run, cfg, reporter, round_=r, policy_init=load_checkpoint(policy_ckpt),
                        value_init=load_checkpoint(rm.checkpoint), submit=submit, push=push,
                        start_version=version, prompts_file=data.prompts, observe=observe)
            state["history"][name] = res.history or state["history"].get(name, [])
            policy_ckpt, version, pushed = res.checkpoint, res.version, True
            write_json(state_file, state)
            # checkpoints/policy always points at the newest policy (what `chatrl up` serves)
            atomic_write_text(stage_dir(cfg, "policy") / "LATEST", f"../{name}/final\n")
    finally:
        if pool is not None:
            pool.close()
        svc.close()
    # evaluation on held-out prompts (gold never seen by any RM), with the last RM's score and KL to SFT
    if gold is not None:
        last_rm = stage_done(stage_dir(cfg, f"reward_r{cfg.pipeline.rounds - 1}"))
        stages = [("base (pre-trained)", "pretrain"), ("SFT", "sft")] + [
            (f"PPO round {r}", ppo.stage_name(r)) for r in range(cfg.pipeline.rounds)]
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
