"""The PPO stage without services: experience alignment, and that PPO raises a reward it is given
while the KL penalty and checkpoints behave."""

from __future__ import annotations

import numpy as np
import pytest

from chatrl.services.core.checkpoint import latest_checkpoint, load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.core.generate import SamplingParams, generate, sequence_logprobs
from chatrl.services.trainer.stages import ppo
from chatrl.services.trainer.stages.common import Reporter, model_from_checkpoint, tokenizer_from_checkpoint
from chatrl.services.trainer.stages.ppo import Experience, make_batch


def test_make_batch_aligns_response_tokens_with_targets():
    e1 = Experience("p", [5, 6, 7], [8, 9], [-0.1, -0.2], [-0.3, -0.4], 1.0, True, 1)
    e2 = Experience("q", [5], [8, 9, 10], [-1.0, -2.0, -3.0], [-1.5, -2.5, -3.5], -1.0, False, 1)
    b = make_batch([e1, e2], pad_id=0)
    assert b.ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # targets are ids[:, 1:]: row 0 → [6, 7, 8, 9]; response tokens 8, 9 are targets 2 and 3
    assert b.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert b.old_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert b.ref_logprobs[1].tolist() == pytest.approx([-1.5, -2.5, -3.5, 0])
    assert b.scores.tolist() == [1.0, -1.0]


def in_process_collect(cfg, trainer_holder, ref_model, target_token: int):
    """Sample from the trainer's current policy in-process; reward = share of `target_token` in the
    response (a reward PPO can clearly climb)."""
    def collect(prompts, version, seed):
        tr = trainer_holder[0]
        tok = tr.tok
        pids = [tok.prompt_ids(p) for p in prompts for _ in range(2)]
        params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed + i, stop_token_ids=(tok.end_id,))
                  for i in range(len(pids))]
        samples = generate(tr.policy, pids, params, tok.pad_id)
        seqs = [p + s.tokens for p, s in zip(pids, samples)]
        ref = sequence_logprobs(ref_model, seqs, tok.pad_id)
        out = []
        for p, s, r in zip(pids, samples, ref):
            score = 5.0 * s.tokens.count(target_token) / len(s.tokens)
            out.append(Experience("x", p, s.tokens, s.logprobs, r[len(p):], score, s.finish_reason == "stop", version))
        return out
    return collect


def test_ppo_climbs_a_reward_and_checkpoints(micro_run, tmp_path):
    cfg, cks = micro_run
    cfg = load_config(None, [f"run_dir={tmp_path}", "dtype=fp32", "threads=1",
                             "ppo.iterations=8", "ppo.prompts_per_iteration=16", "ppo.lr=0.003", "ppo.epochs=4",
                             "ppo.minibatch_size=8", "ppo.init_kl_coef=0.01", "ppo.ckpt_every=4"])
    sft_ck = load_checkpoint(cks["sft"])
    tok = tokenizer_from_checkpoint(sft_ck)
    ref_model = model_from_checkpoint(sft_ck).eval()
    # reward the SFT model's most frequent response token: a signal PPO can clearly climb
    probe = generate(ref_model, [tok.prompt_ids("How was the film?")] * 16,
                     [SamplingParams(max_new_tokens=10, seed=i, stop_token_ids=(tok.end_id,)) for i in range(16)],
                     tok.pad_id)
    counts = np.bincount([t for s in probe for t in s.tokens if t != tok.end_id], minlength=tok.vocab_size)
    target = int(counts.argmax())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["How was the film?", "Did you like the cast?", "Tell me about the story.",
                                  "What did you think of the movie?"] * 4))
    holder = []
    orig_init = ppo.PPOTrainer.__init__

    def capture(self, *a, **k):
        orig_init(self, *a, **k)
        holder[:] = [self]

    pushed = []
    ppo.PPOTrainer.__init__ = capture
    try:
        res = ppo.run(cfg, Reporter(quiet=True), round_=0, policy_init=sft_ck, value_init=load_checkpoint(cks["reward"]),
                      collect=in_process_collect(cfg, holder, ref_model, target),
                      push=lambda sd, v: pushed.append(v), start_version=1, prompts_file=prompts)
    finally:
        ppo.PPOTrainer.__init__ = orig_init
    rewards = [h["reward"] for h in res.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]), rewards
    assert pushed == list(range(2, 10)) and res.version == 9  # one versioned push per iteration
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
    # the trained policy produces the rewarded token more often than the SFT model does (fresh samples)
    pol = model_from_checkpoint(fin).eval()
    probe_ids = [tok.prompt_ids(p) for p in ("How was the film?", "Tell me about the story.") for _ in range(16)]

    def share(m):
        outs = generate(m, probe_ids, [SamplingParams(max_new_tokens=10, seed=1000 + i, stop_token_ids=(tok.end_id,))
                                       for i in range(len(probe_ids))], tok.pad_id)
        return np.mean([s.tokens.count(target) / len(s.tokens) for s in outs])

    s_new, s_old = share(pol), share(ref_model)
    assert s_new > 1.5 * s_old, (s_new, s_old)


def test_async_rollout_overlaps_and_bounds_staleness(micro_run, tmp_path):
    """With async_rollout the next rollout is issued before the update: its samples are one version
    old, kept within max_staleness and learned from with their behaviour logprobs."""
    cfg, cks = micro_run
    cfg = load_config(None, [f"run_dir={tmp_path}", "dtype=fp32", "threads=1", "ppo.iterations=3",
                             "ppo.prompts_per_iteration=4", "ppo.minibatch_size=8", "ppo.async_rollout=true",
                             "ppo.max_staleness=1"])
    sft_ck = load_checkpoint(cks["sft"])
    tok = tokenizer_from_checkpoint(sft_ck)
    policy = model_from_checkpoint(sft_ck).eval()
    prompts = tmp_path / "p.txt"
    prompts.write_text("How was the film?\nDid you like the cast?\n")
    issued, consumed = [], []
    versions = {"now": 1}

    def submit(ps, ver, seed):
        issued.append((ver, versions["now"]))
        pids = [tok.prompt_ids(p) for p in ps]
        samples = generate(policy, pids, SamplingParams(max_new_tokens=6, seed=seed), tok.pad_id)
        ref = sequence_logprobs(policy, [p + s.tokens for p, s in zip(pids, samples)], tok.pad_id)
        exps = [Experience("x", p, s.tokens, s.logprobs, r[len(p):], 1.0, False, ver)
                for p, s, r in zip(pids, samples, ref)]

        def wait():
            consumed.append(versions["now"])
            return exps
        return wait

    def push(sd, v):
        versions["now"] = v

    res = ppo.run(cfg, Reporter(quiet=True), round_=0, policy_init=sft_ck, value_init=load_checkpoint(cks["reward"]),
                  submit=submit, push=push, start_version=1, prompts_file=prompts)
    # iteration i+1's rollout was issued while the trainer was still at version v (before its push)
    assert [v for v, _ in issued] == [1, 1, 2]
    # ... and consumed after that push: samples one version behind the trainer, kept (staleness 1)
    assert consumed == [1, 2, 3]
    # the ratio used the behaviour logprobs (recorded in the checkpoint); the caller's config is untouched
    used = load_checkpoint(res.checkpoint).manifest["meta"]["run_config"]["ppo"]
    assert used["old_logprobs"] == "service" and cfg.ppo.old_logprobs == "recompute"
    assert all(h["dropped_stale"] == 0 for h in res.history) and res.version == 4
    cfg.ppo.max_staleness = 0
    with pytest.raises(ValueError, match="max_staleness"):
        ppo.run(cfg, Reporter(quiet=True), round_=1, policy_init=sft_ck, value_init=load_checkpoint(cks["reward"]),
                submit=submit, push=push, start_version=1, prompts_file=prompts)


def test_ptx_mixes_the_pretraining_loss_into_the_update(micro_run, tmp_path):
    """ppo.ptx_coef > 0 (InstructGPT's PPO-ptx): every minibatch also takes the LM loss on the run's
    pre-training corpus, and the iteration reports it; with 0 it is absent."""
    import dataclasses

    cfg, cks = micro_run
    sft_ck = load_checkpoint(cks["sft"])
    ref_model = model_from_checkpoint(sft_ck).eval()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How was the film?\nTell me about the story.\n")
    holder = []
    orig_init = ppo.PPOTrainer.__init__

    def capture(self, *a, **k):
        orig_init(self, *a, **k)
        holder[:] = [self]

    ppo.PPOTrainer.__init__ = capture
    try:
        for coef in (0.5, 0.0):
            run = dataclasses.replace(cfg, run_dir=str(tmp_path / f"ptx{coef}"), ppo=dataclasses.replace(
                cfg.ppo, iterations=1, prompts_per_iteration=2, ptx_coef=coef))
            res = ppo.run(run, Reporter(quiet=True), round_=0, policy_init=sft_ck,
                          value_init=load_checkpoint(cks["reward"]), collect=in_process_collect(run, holder, ref_model, 5),
                          push=lambda sd, v: None, start_version=1, prompts_file=prompts)
            h = res.history[0]
            if coef:
                assert np.isfinite(h["ptx_loss"]) and h["ptx_loss"] > 0
            else:
                assert "ptx_loss" not in h
    finally:
        ppo.PPOTrainer.__init__ = orig_init
