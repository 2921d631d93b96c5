"""A run survives the death of a service (issue 11, "Faults"): the launcher restarts a process killed with
SIGKILL (as a Kubernetes Deployment would), and the RL loop heals the restarted, empty service before
sampling the failed iteration again — the same prompts and seeds, so every iteration keeps its number of
samples. The kill happens at a fixed point (after iteration 1's metrics), never after a sleep."""

from __future__ import annotations

import os
import signal

import pytest
from kit import micro_config, wait_for

from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.trainer import pipeline
from chatrl.services.trainer.rollout import Endpoints, RayRollout
from chatrl.services.trainer.stages.common import Reporter


class KillAfterFirstIteration(Reporter):
    def __init__(self, kill) -> None:
        super().__init__(quiet=True)
        self.kill, self.iterations = kill, []

    def metrics(self, stage, step, total, values):
        super().metrics(stage, step, total, values)
        if "samples" in values:  # the RL loop's metrics of one iteration
            self.iterations.append(dict(values))
            if step == 1:
                self.kill()


@pytest.mark.parametrize("victim", ["policy", "reward", "reference"])
def test_a_service_killed_mid_ppo_is_restarted_and_the_round_finishes(victim, micro_run, tiny_data, tmp_path,
                                                                     ray_session):
    from chatrl.services.runtime.launcher import launch_pipeline_services

    base, cks = micro_run
    cfg = micro_config(tiny_data, tmp_path / "run", "ppo.iterations=3", "ppo.ckpt_every=10", "ppo.num_workers=1",
                       "ppo.prompts_per_iteration=4", "ppo.samples_per_prompt=2")
    cluster = launch_pipeline_services("", [], tmp_path / "run", "cpu")
    try:
        ep = Endpoints(*(cluster.address(n) for n in ("policy", "reward", "reference")),
                       feedback=cluster.address("feedback"))
        svc = pipeline.connect(ep)
        rep = KillAfterFirstIteration(lambda: os.kill(cluster.procs[victim].pid, signal.SIGKILL))
        pipeline.seed_models(svc, cks["sft"], rep)
        pipeline.serve_reward_model(svc, cks["reward"], rep)
        source = RayRollout(ep, cfg.ppo)
        try:
            version = max(svc.policy.model_versions().values())
            res = pipeline.ppo_round(cfg, rep, svc, source, 0, cks["sft"], cks["reward"], version,
                                     ["How was the film?", "Tell me about the story.", "Did you like the cast?",
                                      "Write a short review."], pipeline.policy_metadata(cks["sft"]), None,
                                     reference_ckpt=cks["sft"])
        finally:
            source.close()
            svc.close()
        wait_for(lambda: cluster.restarts.get(victim) == 1, what=f"{victim} restarted")
        assert [h["samples"] for h in rep.iterations] == [8.0, 8.0, 8.0]  # none lost, none twice
        assert [h["degraded"] > 0 for h in rep.iterations] == [False, True, False]
        assert [h["policy_version"] for h in rep.iterations] == [version + 1, version + 2, version + 3]
        assert load_checkpoint(res.checkpoint).manifest["meta"].get("final")
    finally:
        cluster.stop()
