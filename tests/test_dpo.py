"""DPO from K-way rankings (stages/dpo.py) in the supervised loop, against a frozen reference: every
ranking gives its C(K,2) pairs, the policy learns to prefer the ranked-higher responses, and DPO
without a reference is refused before any work."""

from __future__ import annotations

import dataclasses

import pytest

from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.formats import Ranking, load_rankings
from chatrl.services.trainer.stages import dpo
from chatrl.services.trainer.stages.common import Reporter, model_from_checkpoint, tokenizer_from_checkpoint


def test_every_ranking_gives_all_its_pairs_with_the_reference_logprobs(micro_run):
    cfg, cks = micro_run
    tok = tokenizer_from_checkpoint(load_checkpoint(cks["sft"]))
    seen = []

    def ref(seqs, starts):  # a stand-in reference: the response length, so each pair is recognisable
        seen.extend(starts)
        return [float(len(s) - st) for s, st in zip(seqs, starts)]

    r = Ranking("How was the film?", ["Good.", "It was a delight to watch", "Bad"], [1, 0, 2], [True, True, False])
    (pairs,) = dpo.encode_pairs(tok, [r], 96, ref)
    assert len(pairs) == 3 and len(seen) == 3  # C(3,2) pairs; each response scored once
    lens = [len(tok.encode(x)) + f for x, f in zip(r.responses, r.finished)]
    assert [(c, rej) for _, _, c, rej in pairs] == [(lens[1], lens[0]), (lens[1], lens[2]), (lens[0], lens[2])]
    for (cids, cst), _, _, _ in pairs:
        assert cids[:cst] == tok.prompt_ids("How was the film?")


def test_dpo_learns_the_rankings_against_the_sft_reference(micro_run, tiny_data, tmp_path):
    cfg, cks = micro_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path), dpo=dataclasses.replace(
        cfg.dpo, beta=0.5, lr=0.002, epochs=3, batch_size=8, eval_fraction=0.25))
    sft = load_checkpoint(cks["sft"])
    ref = dpo.local_reference(model_from_checkpoint(sft).eval(), cfg, tokenizer_from_checkpoint(sft).pad_id)
    res = dpo.run(cfg, Reporter(quiet=True), str(cks["sft"]), load_rankings(tiny_data["rankings"]), ref, round_=0)
    m = res.metrics
    # the held-out pairs' preference: ~chance at the start (policy = reference), learnt after
    assert m["eval_accuracy"] > 0.8 and m["eval_accuracy"] > m["eval_accuracy_before"] + 0.2, m
    assert m["eval_loss"] < m["eval_loss_before"]
    ck = load_checkpoint(res.checkpoint)
    assert ck.manifest["stage"] == "dpo_r0" and ck.manifest["meta"]["final"]
    # a finished DPO round is not trained again
    assert dpo.run(cfg, Reporter(quiet=True), str(cks["sft"]), [], ref).checkpoint == res.checkpoint


def test_dpo_without_a_reference_is_refused(micro_run, tmp_path):
    cfg, cks = micro_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"dpo\.reference"):
        dpo.run(cfg, Reporter(quiet=True), str(cks["sft"]), [], None)
