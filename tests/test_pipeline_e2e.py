"""The whole InstructGPT loop on a micro config, through real services (as processes, launched empty by
whoever starts the pipeline and seeded by the pipeline) and Ray: pre-train → SFT → comparisons from the
policy → simulated labelers label through the feedback API → reward model → reward-scoring loads it →
PPO with Ray rollout workers and a weight push per iteration."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kit import MICRO, kill_9_in_ppo_then_resume

from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.core.formats import load_rankings
from chatrl.services.trainer.pipeline import run_pipeline
from chatrl.services.trainer.runs import run_endpoints
from chatrl.services.trainer.stages.common import Reporter

POLL_S = 0.02


def micro_pipeline_cfg(tiny_data, tiny_gold, run_dir, extra=()):
    return load_config(MICRO, [
        f"run_dir={run_dir}", f"data.pretrain_files=[{tiny_data['corpus']}]", f"data.sft_file={tiny_data['sft']}",
        f"data.prompts_file={tiny_data['prompts']}", f"data.eval_prompts_file={tiny_data['eval_prompts']}",
        f"data.gold_file={tiny_gold}", *extra])


def pipeline_on_local_services(cfg) -> dict:
    """What `chatrl pipeline run` does: launch the services (empty) for the run, run it, stop them."""
    rep = Reporter(quiet=True)
    with run_endpoints(cfg, rep) as endpoints:
        return run_pipeline(cfg, rep, endpoints)


def test_pipeline_end_to_end_through_services_and_ray(tiny_data, tiny_gold, tmp_path, ray_session):
    """Two RLHF rounds: round 1 ranks fresh samples of round 0's final policy, its reward model learns from
    both rounds' rankings, and its PPO continues from round 0's policy and version. A third of the prompts
    are conversations (multi-turn): they reach the comparison tasks, the reward model and PPO as such."""
    prompts = tmp_path / "prompts.jsonl"
    with open(tiny_data["prompts"]) as src, open(prompts, "w") as out:
        for i, line in enumerate(src):
            q = json.loads(line)["prompt"]
            row = {"messages": [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content":
                                "Hello! Ask me about a film."}, {"role": "user", "content": q}]} if i % 3 == 0 \
                else {"prompt": q}
            out.write(json.dumps(row) + "\n")
    cfg = micro_pipeline_cfg(tiny_data, tiny_gold, tmp_path / "run", ["pipeline.rounds=2",
                                                                      f"data.prompts_file={prompts}"])
    res = pipeline_on_local_services(cfg)
    run = tmp_path / "run"
    it = cfg.ppo.iterations
    # labels went through the feedback service, each round's from that round's starting policy
    for r, version in ((0, 1), (1, 1 + it)):  # the SFT weights are version 1; round 0 pushes 2 … 1 + it
        rows = [json.loads(ln) for ln in (run / "data" / f"rankings_r{r}.jsonl").open()]
        assert len(rows) == cfg.reward.num_prompts and all(len(x["responses"]) == cfg.reward.k for x in rows)
        assert {x["policy_model_version"] for x in rows} == {version}
        multi = [x for x in rows if len(x["messages"]) > 1]  # conversations, ranked as conversations
        assert multi and all(x["messages"][0]["content"] == "Hello there." for x in multi)
    rankings = load_rankings(run / "data" / "rankings_r1.jsonl")
    # round 1's reward model learned from every ranking so far (reward.train_on: all)
    assert load_checkpoint(run / "checkpoints" / "reward_r0").manifest["meta"]["num_rankings"] == len(rankings)
    assert load_checkpoint(run / "checkpoints" / "reward_r1").manifest["meta"]["num_rankings"] == 2 * len(rankings)
    # PPO ran its iterations against the services; one weight push per iteration, versions continuing
    for r in (0, 1):
        hist = res["history"][f"ppo_r{r}"]
        assert [h["policy_version"] for h in hist] == [2 + r * it + i for i in range(it)]
        assert all(h["samples"] == cfg.ppo.prompts_per_iteration * cfg.ppo.samples_per_prompt for h in hist)
    ck = load_checkpoint(run / "checkpoints" / "policy")
    assert ck.manifest["meta"]["final"] and ck.manifest["meta"]["policy_version"] == 1 + 2 * it
    # evaluation rows for every stage and a report with plots
    assert set(res["evals"]) == {"base (pre-trained)", "SFT", "PPO round 0", "PPO round 1"}
    assert all("gold" in e and "kl" in e for e in res["evals"].values())
    report = Path(res["report"])
    assert report.exists() and (report.parent / "ppo.png").exists()
    assert "PPO round 1" in report.read_text()
    state = json.loads((run / "pipeline.json").read_text())
    assert {"pretrain", "sft", "labels_r0", "reward_r0", "ppo_r0", "labels_r1", "reward_r1", "ppo_r1"} \
        <= set(state["times"])
    # label-to-policy latency: each round's rankings to the round's first push (round 1's RM also used round
    # 0's, but round 0's policy was the first trained on those)
    for r in (0, 1):
        lat = state["label_to_policy"][f"ppo_r{r}"]
        assert lat["labels"] == len(rankings)
        spent = sum(state["times"][k] for k in (f"labels_r{r}", f"reward_r{r}", f"ppo_r{r}"))
        assert 0 <= lat["label_to_policy_s_median"] <= lat["label_to_policy_s_max"] <= spent
    assert "Label-to-policy latency" in report.read_text()


def test_kill_9_then_resume_reaches_the_uninterrupted_result(tiny_data, tiny_gold, tmp_path, ray_session):
    """kill -9 the pipeline (and its Ray) in the middle of PPO; `chatrl pipeline resume` continues from
    the last checkpoints and, with the fixed seed, ends where an uninterrupted run ends."""
    import os
    import time

    import torch

    longer = ["ppo.iterations=10"]  # room to kill it between the iteration-2 checkpoint and the end
    ref_cfg = micro_pipeline_cfg(tiny_data, tiny_gold, tmp_path / "ref", longer)
    ref = pipeline_on_local_services(ref_cfg)
    cfg = micro_pipeline_cfg(tiny_data, tiny_gold, tmp_path / "b", longer)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def services_drain() -> None:  # the services it started (own sessions) notice their parent is gone
        logs = tmp_path / "b" / "logs"
        deadline = time.monotonic() + 60
        while not all("is gone; draining" in (logs / f"{n}.log").read_text()
                      for n in ("policy", "reward", "reference", "feedback")):
            assert time.monotonic() < deadline, "services outlived the killed pipeline"
            time.sleep(POLL_S)

    stderr = kill_9_in_ppo_then_resume(cfg, env, after_kill=services_drain)
    assert "pretrain: already finished" in stderr
    # it was killed at or after the iteration-2 checkpoint (a fast machine may finish another iteration
    # between seeing the marker and the kill) and before the end
    resumed = re.search(r"resuming after iteration (\d+)", stderr)
    assert resumed and 2 <= int(resumed.group(1)) < 10, stderr[-3000:]
    wa = load_checkpoint(Path(ref["policy"])).model_state()
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "ppo_r0" / "final").model_state()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), (k, float((wa[k] - wb[k]).abs().max()))
    assert json.loads((tmp_path / "b" / "pipeline.json").read_text())["evals"].keys() == ref["evals"].keys()


def test_rollout_reissues_the_shard_of_a_worker_that_died(micro_run, ray_session):
    """A Ray rollout worker killed (SIGKILL) while its Generate is in flight: its shard goes to another
    worker and the rollout returns every sample. The policy engine is paused so that both shards are
    provably in flight when the kill lands."""
    import os
    import signal

    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.policy.server import build as build_policy
    from chatrl.services.reference.server import ReferenceConfig
    from chatrl.services.reference.server import build as build_reference
    from chatrl.services.reward.server import RewardConfig
    from chatrl.services.reward.server import build as build_reward
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer.rollout import Endpoints, RolloutPool

    cks = micro_run[1]
    open_cfg = ServerConfig(port=0, auth_token_env="")
    built = [build_policy(open_cfg, PolicyConfig(checkpoint=str(cks["sft"]), max_new_tokens=16)),
             build_reward(open_cfg, RewardConfig(checkpoint=str(cks["reward"]))),
             build_reference(open_cfg, ReferenceConfig(checkpoint=str(cks["sft"])))]
    (pol, pol_svc), (rw, _), (ref, _) = built
    pool = RolloutPool(Endpoints(pol.address, rw.address, ref.address), num_workers=2, num_cpus=0.5)
    eng = pol_svc.engine
    try:
        # a Ray worker process starting (torch + grpc imports): minutes on a loaded 2-core machine (120 s was
        # not enough beside two CPU burners and the rest of the suite)
        victim = ray_session.get(pool.actors[0].pid.remote(), timeout=600)
        eng.pause()
        pending = pool.submit(["How was the film?", "Tell me about the story.", "Did you like it?",
                               "What did you think?"], n=2, max_new_tokens=6, temperature=1.0, seed=5)
        with eng._cv:  # notified on every enqueue: wait until both shards' Generate calls are queued
            assert eng._cv.wait_for(lambda: eng.stats.queue_depth >= 2, timeout=600), eng.stats
        os.kill(victim, signal.SIGKILL)
        eng.resume()
        exps = pending.result()
        assert pool.reissued == 1
        assert sorted(e.prompt for e in exps) == sorted(["How was the film?", "Tell me about the story.",
                                                         "Did you like it?", "What did you think?"] * 2)
        assert all(e.response_ids and len(e.ref_logprobs) == len(e.response_ids) for e in exps)
    finally:
        eng.resume()
        pool.close()
        for srv, svc in built:
            srv.stop(0)
            getattr(svc, "close", lambda: None)()


def test_async_rollout_through_ray_overlaps_within_the_staleness_bound(micro_run, tmp_path, ray_session):
    """ppo.async_rollout with the Ray rollout workers and real services: the rollout of iteration i+1 is in
    flight while iteration i updates, so its samples are of the trainer's version or (if Generate ran
    before the push landed) one older — within max_staleness, so none is dropped — and every push reaches
    the service."""
    import dataclasses

    from chatrl.clients.lib import PolicyClient
    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.policy.server import build as build_policy
    from chatrl.services.reference.server import ReferenceConfig
    from chatrl.services.reference.server import build as build_reference
    from chatrl.services.reward.server import RewardConfig
    from chatrl.services.reward.server import build as build_reward
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer.rl import PolicyServiceSink, RLLoop
    from chatrl.services.trainer.rollout import Endpoints, RayRollout
    from chatrl.services.trainer.stages.ppo import PPOTrainer

    cfg, cks = micro_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path), ppo=dataclasses.replace(
        cfg.ppo, iterations=3, async_rollout=True, max_staleness=1, prompts_per_iteration=4, num_workers=2))
    open_cfg = ServerConfig(port=0, auth_token_env="")
    built = [build_policy(open_cfg, PolicyConfig(checkpoint=str(cks["sft"]), max_new_tokens=16)),
             build_reward(open_cfg, RewardConfig(checkpoint=str(cks["reward"]))),
             build_reference(open_cfg, ReferenceConfig(checkpoint=str(cks["sft"])))]
    (pol, _), (rw, _), (ref, _) = built
    endpoints = Endpoints(pol.address, rw.address, ref.address)
    source = RayRollout(endpoints, cfg.ppo)
    client = PolicyClient(pol.address, timeout=120)
    try:
        trainer = PPOTrainer.from_checkpoints(cfg, load_checkpoint(cks["sft"]), load_checkpoint(cks["reward"]), 0)
        seen = []  # (versions of the samples, trainer version) at each update
        loop = RLLoop(trainer, source, PolicyServiceSink(client), ["How was the film?", "Tell me about the story."],
                      Reporter(quiet=True), observe=lambda exps: seen.append(
                          ({e.version for e in exps}, trainer.version)) or {})
        start = client.model_info().model_version
        res = loop.run(start)
        assert seen[0] == ({start}, start) and [tv for _, tv in seen] == [start, start + 1, start + 2]
        assert all(tv - v in (0, 1) for vs, tv in seen for v in vs), seen
        assert loop._pending is None  # the last iteration issued no rollout beyond the round
        assert [h["dropped_stale"] for h in res.history] == [0, 0, 0]
        assert client.model_info().model_version == res.version == start + 3
    finally:
        source.close()
        client.close()
        for srv, svc in built:
            srv.stop(0)
            getattr(svc, "close", lambda: None)()
