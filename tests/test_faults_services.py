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


def test_an_empty_policy_replica_of_a_lora_run_is_healed_with_the_base_and_the_current_adapters(tmp_path):
    """With LoRA the RL loop pushes only adapters, which a replica restarted empty cannot apply (it has no
    base): the heal gives it the full weights — the SFT base and the current adapters — as the trainer's
    version, after which it takes adapter pushes again. A tiny Llama, one in-process policy-inference."""
    pytest.importorskip("peft")
    import torch
    from kit import save_tiny_checkpoint, tiny_hf_dir

    from chatrl.clients.lib import PolicyClient, ReplicaError, ReplicaGroup
    from chatrl.services.core.hf import load_hf
    from chatrl.services.core.lora import LoraConfig, adapter_state_dict, apply_lora
    from chatrl.services.policy.server import PolicyConfig, build
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer.rl import PolicyServiceSink

    policy, tok = load_hf(tiny_hf_dir(tmp_path / "tiny-llama"))
    apply_lora(policy, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    meta = pipeline.policy_metadata(save_tiny_checkpoint(tmp_path / "sft", policy, tok))  # lora_base: the SFT

    def train_adapters() -> None:  # what PPO changes: the adapters only (B starts at zero)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if ".lora_B." in name:
                    p.add_(0.25)

    train_adapters()
    srv, svc = build(ServerConfig(port=0, auth_token_env=""), PolicyConfig())
    group = ReplicaGroup(PolicyClient, srv.address, timeout=120)
    try:
        # what the heal pushed before: adapters to an empty replica, which it refuses
        with pytest.raises(ReplicaError, match="FAILED_PRECONDITION: chunk.metadata.weights: an adapter push"):
            PolicyServiceSink(group, meta).push(adapter_state_dict(policy), 3)
        assert group.model_versions() == {srv.address: 0}

        assert pipeline.heal_policy_replicas(group, 3, lambda: adapter_state_dict(policy), policy.state_dict,
                                             meta) == 1
        served = svc.engine.latest
        assert served.version == 3 and served.meta["lora_base"] == meta["lora_base"]
        mine = served.model.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in policy.state_dict().items())
        assert pipeline.heal_policy_replicas(group, 3, lambda: adapter_state_dict(policy), policy.state_dict,
                                             meta) == 0  # serving the version already: left alone

        train_adapters()  # the next iteration's push: adapters only, applied to the base it now holds
        PolicyServiceSink(group, meta).push(adapter_state_dict(policy), 4)
        served = svc.engine.latest
        assert served.version == 4 and served.meta["weights"] == "adapter"
        mine = served.model.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in policy.state_dict().items())
    finally:
        group.close()
        srv.stop(0)
        svc.close()
