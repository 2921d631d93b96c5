"""The critic-free siblings of PPO (GRPO, RLOO, REINFORCE++ with baseline) in the one RL loop, with the
in-process rollout source: no value model is built, checkpointed or needed to resume; the KL can be a
loss term; GRPO climbs a reward it is given; bad settings are refused when the config is built."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.config import ConfigError, load_config
from chatrl.services.trainer.rl import NullSink, RLLoop
from chatrl.services.trainer.rollout import InProcessRollout
from chatrl.services.trainer.stages.common import Reporter, model_from_checkpoint
from chatrl.services.trainer.stages.ppo import PPOTrainer

PROMPTS = ["How was the film?", "Did you like the cast?", "Tell me about the story.", "What did you think of the movie?"]
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")


def loop_for(cfg, cks, reward, sink=None):
    """The RL loop on the trainer's own policy module (on-policy without pushes), reference = SFT; the
    critic-free trainer gets no value-model checkpoint at all."""
    sft_ck = load_checkpoint(cks["sft"])
    value = load_checkpoint(cks["reward"]) if cfg.ppo.algorithm == "ppo" else None
    trainer = PPOTrainer.from_checkpoints(cfg, sft_ck, value, round_=0)
    source = InProcessRollout.for_config(trainer.cfg, trainer.policy, model_from_checkpoint(sft_ck).eval(), reward,
                                         trainer.tok)
    return RLLoop(trainer, source, sink or NullSink(), PROMPTS * 4, Reporter(quiet=True))


def with_ppo(cfg, tmp_path, **kw):
    return dataclasses.replace(cfg, run_dir=str(tmp_path), ppo=dataclasses.replace(cfg.ppo, **kw))


@pytest.mark.parametrize("algorithm", CRITIC_FREE)
def test_critic_free_round_has_no_value_model_and_resumes_without_one(micro_run, tmp_path, algorithm):
    cfg, cks = micro_run
    cfg = with_ppo(cfg, tmp_path, algorithm=algorithm, iterations=2, ckpt_every=1, prompts_per_iteration=3,
                   samples_per_prompt=3)
    loop = loop_for(cfg, cks, lambda p, r: float(len(r)))
    assert loop.trainer.critic is None and loop.trainer.opt_v is None
    loop.trainer.version = 1
    loop.trainer.save(metrics=loop.iteration(issue_next=False))  # iteration 1, then "killed"
    it1 = load_checkpoint(tmp_path / "checkpoints" / "ppo_r0" / "iter-00001")
    assert not it1.has("value") and not it1.has("value_optimizer") and it1.optimizer_state() is not None
    sink = NullSink()
    res = loop_for(cfg, cks, lambda p, r: float(len(r)), sink).run(start_version=2)
    assert [h["iteration"] for h in res.history] == [2] and sink.versions == [3, 4]
    h = res.history[0]
    assert "value_loss" not in h and np.isfinite(h["policy_loss"]) and h["samples"] > 0
    assert not load_checkpoint(res.checkpoint).has("value")


def test_kl_as_a_loss_term_is_reported_and_not_in_the_reward(micro_run, tmp_path):
    cfg, cks = micro_run
    cfg = with_ppo(cfg, tmp_path, algorithm="grpo", kl_mode="loss", kl_estimator="k3", init_kl_coef=0.5,
                   iterations=2, prompts_per_iteration=3, samples_per_prompt=3, lr=0.003, epochs=2)
    hist = loop_for(cfg, cks, lambda p, r: float(len(r))).run(start_version=1).history
    assert "kl_loss" in hist[0] and all(h["kl_loss"] >= 0 for h in hist)  # k3 is never negative
    assert hist[1]["kl_loss"] > 0  # after one update the policy has moved away from the reference


def test_grpo_climbs_a_reward(micro_run, tmp_path):
    """Reward = share of a fixed token in the response: GRPO raises it (no value model)."""
    cfg, cks = micro_run
    cfg = with_ppo(cfg, tmp_path, algorithm="grpo", iterations=8, prompts_per_iteration=4, samples_per_prompt=4,
                   max_new_tokens=10, lr=0.003, epochs=4, minibatch_size=8, init_kl_coef=0.01)
    loop = loop_for(cfg, cks, lambda p, r: 0.0)
    target = loop.trainer.tok.end_id  # ending the turn early: a behaviour the SFT model already has some of
    loop.source.reward = lambda p, r: float(r[-1] == target) - 0.05 * len(r)
    rewards = [h["reward"] for h in loop.run(start_version=1).history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]), rewards


@pytest.mark.parametrize("override, field", [
    ("ppo.algorithm=a2c", "ppo.algorithm"),
    ("ppo.samples_per_prompt=1", "ppo.samples_per_prompt"),
    ("ppo.kl_mode=both", "ppo.kl_mode"),
    ("ppo.loss_norm=row", "ppo.loss_norm"),
    ("pipeline.method=kto", "pipeline.method"),
    ("dpo.beta=0", "dpo.beta"),
    ("dpo.beta=-1", "dpo.beta"),
    ("dpo.loss=hinge", "dpo.loss"),
])
def test_bad_settings_are_refused_naming_the_field(override, field):
    algo = [] if override.startswith("ppo.algorithm") else ["ppo.algorithm=grpo"]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [*algo, override])


def test_kl_loss_needs_an_estimator_with_a_gradient():
    with pytest.raises(ConfigError, match=r"ppo\.kl_estimator"):
        load_config(None, ["ppo.algorithm=grpo", "ppo.kl_mode=loss", "ppo.kl_estimator=k1"])
    with pytest.raises(ConfigError, match=r"ppo\.kl_mode"):  # PPO's critic learns the shaped reward
        load_config(None, ["ppo.kl_mode=loss", "ppo.kl_estimator=k3"])
