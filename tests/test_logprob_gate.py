"""The five methods end to end through the real services (processes) and Ray on the micro config, one set
of services for all: iterative DPO (2 rounds, each ranking fresh samples of the current policy through the
feedback service), then PPO, GRPO, RLOO and REINFORCE++ as StartRun(STAGE_PPO) runs. Every RL iteration
also checks the logprob consistency gate: the trainer's fp32 recomputation of each token policy-inference
sampled, with the same weights, must agree with the logprob the service returned to 1e-5 nats — the test
fails if the service and the trainer disagree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.trainer.pipeline import run_pipeline, run_ppo_stage
from chatrl.services.trainer.runs import run_endpoints
from chatrl.services.trainer.stages.common import Reporter

MICRO = Path(__file__).parents[1] / "configs" / "micro.yaml"
GATE = 1e-5


def test_five_methods_through_the_services_and_the_logprob_gate(micro_run, tiny_data, tiny_gold, tmp_path,
                                                                 ray_session):
    _, cks = micro_run
    cfg = load_config(MICRO, [
        f"run_dir={tmp_path / 'dpo'}", f"data.pretrain_files=[{tiny_data['corpus']}]", f"data.sft_file={tiny_data['sft']}",
        f"data.prompts_file={tiny_data['prompts']}", f"data.eval_prompts_file={tiny_data['eval_prompts']}",
        f"data.gold_file={tiny_gold}", "pipeline.method=dpo", "pipeline.rounds=2", "dpo.epochs=1",
        "reward.num_prompts=12", "pipeline.eval_prompts=4"])
    rep = Reporter(quiet=True)
    with run_endpoints(cfg, rep) as endpoints:
        res = run_pipeline(cfg, rep, endpoints)
        # iterative DPO: two rounds, each from fresh rankings, each pushed to policy-inference; no reward model
        run = tmp_path / "dpo"
        assert {"labels_r0", "dpo_r0", "labels_r1", "dpo_r1"} <= set(res["times"]) and "reward_r0" not in res["times"]
        assert not (run / "checkpoints" / "reward_r0").exists()
        assert [res["history"][f"dpo_r{r}"][0]["policy_version"] for r in (0, 1)] == [2.0, 3.0]
        assert load_checkpoint(run / "checkpoints" / "policy").manifest["stage"] == "dpo_r1"
        assert {"SFT", "DPO round 0", "DPO round 1"} <= set(res["evals"])
        sft = run / "checkpoints" / "sft"
        for algorithm in ("ppo", "grpo", "rloo", "reinforce_pp"):
            rl = dataclasses.replace(cfg, run_dir=str(tmp_path / algorithm), ppo=dataclasses.replace(
                cfg.ppo, algorithm=algorithm, iterations=2, prompts_per_iteration=3, samples_per_prompt=2,
                policy_init=str(sft), reward_model=str(cks["reward"])))
            hist = run_ppo_stage(rl, rep, endpoints).history
            assert len(hist) == 2, algorithm
            for h in hist:
                assert h["logprob_gate_tokens"] > 0 and h["logprob_gate_max"] <= GATE, (algorithm, h)
            assert ("value_loss" in hist[0]) == (algorithm == "ppo")
