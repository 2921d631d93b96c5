"""The RL loop with the in-process rollout source (the real policy, reference and reward computation in
this process, no services): experience alignment, that PPO raises a reward it is given while the KL
penalty and checkpoints behave, async rollout's staleness, and PPO-ptx."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chatrl.services.core.checkpoint import latest_checkpoint, load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.core.generate import SamplingParams, generate
from chatrl.services.trainer.experience import Experience, make_batch
from chatrl.services.trainer.rl import NullSink, RLLoop
from chatrl.services.trainer.rollout import InProcessRollout, reward_model_scorer
from chatrl.services.trainer.stages.common import Reporter, model_from_checkpoint, tokenizer_from_checkpoint
from chatrl.services.trainer.stages.ppo import PPOTrainer, loop_config

PROMPTS = ["How was the film?", "Did you like the cast?", "Tell me about the story.", "What did you think of the movie?"]


def test_make_batch_aligns_response_tokens_with_targets():
    e1 = Experience("p", [5, 6, 7], [8, 9], [-0.1, -0.2], [-0.3, -0.4], 1.0, True, 1)
    e2 = Experience("q", [5], [8, 9, 10], [-1.0, -2.0, -3.0], [-1.5, -2.5, -3.5], -1.0, False, 1)
    b = make_batch([e1, e2], pad_id=0)
    assert b.ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # targets are ids[:, 1:]: row 0 → [6, 7, 8, 9]; response tokens 8, 9 are targets 2 and 3
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert b.logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert b.ref_logprobs[1].tolist() == pytest.approx([-1.5, -2.5, -3.5, 0])
    assert b.scores.tolist() == [1.0, -1.0]
    assert b.select([1]).ids.tolist() == [[5, 8, 9, 10, 0]] and b.select([1]).advantages is None


def on_policy_loop(cfg, cks, reward, sink=None):
    """The RL loop whose in-process source samples from the trainer's own policy module (so every
    rollout is of the current weights without a copy), reference = the SFT model."""
    sft_ck = load_checkpoint(cks["sft"])
    trainer = PPOTrainer.from_checkpoints(cfg, sft_ck, load_checkpoint(cks["reward"]), round_=0)
    ref_model = model_from_checkpoint(sft_ck).eval()
    source = InProcessRollout.for_config(trainer.cfg, trainer.policy, ref_model, reward, trainer.tok)
    return RLLoop(trainer, source, sink or NullSink(), PROMPTS * 4, Reporter(quiet=True)), ref_model


def test_ppo_climbs_a_reward_and_checkpoints(micro_run, tmp_path):
    cfg, cks = micro_run
    cfg = load_config(None, [f"run_dir={tmp_path}", "dtype=fp32", "threads=1", "ppo.iterations=8",
                             "ppo.prompts_per_iteration=16", "ppo.samples_per_prompt=2", "ppo.max_new_tokens=10",
                             "ppo.lr=0.003", "ppo.epochs=4", "ppo.minibatch_size=8", "ppo.init_kl_coef=0.01",
                             "ppo.ckpt_every=4"])
    sft_ck = load_checkpoint(cks["sft"])
    tok = tokenizer_from_checkpoint(sft_ck)
    sft_model = model_from_checkpoint(sft_ck).eval()
    # reward the SFT model's most frequent response token: a signal PPO can clearly climb
    probe = generate(sft_model, [tok.prompt_ids("How was the film?")] * 16,
                     [SamplingParams(max_new_tokens=10, seed=i, stop_token_ids=(tok.end_id,)) for i in range(16)],
                     tok.pad_id)
    counts = np.bincount([t for s in probe for t in s.tokens if t != tok.end_id], minlength=tok.vocab_size)
    target = int(counts.argmax())
    sink = NullSink()
    loop, ref_model = on_policy_loop(cfg, cks, lambda p, r: 5.0 * r.count(target) / len(r), sink)
    res = loop.run(start_version=1)
    rewards = [h["reward"] for h in res.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]), rewards
    assert sink.versions == list(range(2, 10)) and res.version == 9  # one versioned push per iteration
    assert all(np.isfinite(h["kl"]) and h["beta"] > 0 for h in res.history)
    # with the policy's own logprobs recomputed, the first minibatch starts exactly on-policy
    assert res.history[0]["ratio_mean"] == pytest.approx(1.0, abs=0.05)
    fin = load_checkpoint(res.checkpoint)
    assert fin.manifest["meta"]["final"] and fin.manifest["meta"]["policy_version"] == 9
    assert "scalar_head.weight" in fin.tensors("value")
    # iteration checkpoints carry everything needed to resume
    it4 = load_checkpoint(tmp_path / "checkpoints" / "ppo_r0" / "iter-00004")
    assert it4.optimizer_state() is not None and it4.manifest["meta"]["kl_controller"]["value"] > 0
    assert latest_checkpoint(tmp_path / "checkpoints" / "ppo_r0").path == fin.path
    # a finished round is not run again
    again, _ = on_policy_loop(cfg, cks, lambda p, r: 0.0)
    assert again.run(start_version=1).checkpoint == res.checkpoint
    # the trained policy produces the rewarded token more often than the SFT model does (fresh samples)
    pol = model_from_checkpoint(fin).eval()
    probe_ids = [tok.prompt_ids(p) for p in ("How was the film?", "Tell me about the story.") for _ in range(16)]

    def share(m):
        outs = generate(m, probe_ids, [SamplingParams(max_new_tokens=10, seed=1000 + i, stop_token_ids=(tok.end_id,))
                                       for i in range(len(probe_ids))], tok.pad_id)
        return np.mean([s.tokens.count(target) / len(s.tokens) for s in outs])

    s_new, s_old = share(pol), share(ref_model)
    assert s_new > 1.5 * s_old, (s_new, s_old)


def test_a_killed_round_resumes_from_its_last_checkpoint(micro_run, tmp_path):
    """Stopped after iteration 2 (checkpointed), the round resumes at iteration 2, pushes the restored
    weights as a new version first, and runs only the iterations left."""
    cfg, cks = micro_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path), ppo=dataclasses.replace(cfg.ppo, iterations=3, ckpt_every=1))
    loop, _ = on_policy_loop(cfg, cks, lambda p, r: float(len(r)))
    loop.trainer.version = 1
    for _ in range(2):
        loop.trainer.save(metrics=loop.iteration(issue_next=False))
    sink = NullSink()
    resumed, _ = on_policy_loop(cfg, cks, lambda p, r: float(len(r)), sink)
    res = resumed.run(start_version=3)
    assert [h["iteration"] for h in res.history] == [3]
    assert sink.versions == [4, 5] and res.version == 5  # restored weights as 4, then iteration 3's push


def test_async_rollout_overlaps_and_bounds_staleness(micro_run, tmp_path):
    """With async_rollout the next rollout is issued before the update: its samples are one version
    old, kept within max_staleness and learned from with their behaviour logprobs."""
    cfg, cks = micro_run
    cfg = load_config(None, [f"run_dir={tmp_path}", "dtype=fp32", "threads=1", "ppo.iterations=3",
                             "ppo.prompts_per_iteration=4", "ppo.max_new_tokens=6", "ppo.minibatch_size=8",
                             "ppo.async_rollout=true", "ppo.max_staleness=1"])
    seen = []  # (sample versions, trainer version) at each update
    sft_ck = load_checkpoint(cks["sft"])
    trainer = PPOTrainer.from_checkpoints(cfg, sft_ck, load_checkpoint(cks["reward"]), round_=0)
    source = InProcessRollout.for_config(trainer.cfg, trainer.policy, model_from_checkpoint(sft_ck).eval(),
                                         reward_model_scorer(load_checkpoint(cks["reward"])), trainer.tok)
    loop = RLLoop(trainer, source, NullSink(), PROMPTS, Reporter(quiet=True),
                  observe=lambda exps: seen.append(({e.version for e in exps}, trainer.version)) or {})
    res = loop.run(start_version=1)
    # iteration i+1's rollout was sampled at the version before iteration i's push, and learned from
    # after it: one version behind the trainer, kept (staleness 1)
    assert seen == [({1}, 1), ({1}, 2), ({2}, 3)]
    # the ratio used the behaviour logprobs (recorded in the checkpoint); the caller's config is untouched
    used = load_checkpoint(res.checkpoint).manifest["meta"]["run_config"]["ppo"]
    assert used["old_logprobs"] == "service" and cfg.ppo.old_logprobs == "recompute"
    assert all(h["dropped_stale"] == 0 for h in res.history) and res.version == 4
    with pytest.raises(ValueError, match="max_staleness"):
        loop_config(dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, max_staleness=0)))


def test_ptx_mixes_the_pretraining_loss_into_the_update(micro_run, tmp_path):
    """ppo.ptx_coef > 0 (InstructGPT's PPO-ptx): every minibatch also takes the LM loss on the run's
    pre-training corpus, and the iteration reports it; with 0 it is absent."""
    cfg, cks = micro_run
    for coef in (0.5, 0.0):
        run = dataclasses.replace(cfg, run_dir=str(tmp_path / f"ptx{coef}"), ppo=dataclasses.replace(
            cfg.ppo, iterations=1, prompts_per_iteration=2, ptx_coef=coef))
        loop, _ = on_policy_loop(run, cks, lambda p, r: 1.0)
        h = loop.run(start_version=1).history[0]
        if coef:
            assert np.isfinite(h["ptx_loss"]) and h["ptx_loss"] > 0
        else:
            assert "ptx_loss" not in h
