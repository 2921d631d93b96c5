"""The three offline training stages end to end on a micro config, plus resume after interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chatrl.services.cli import main
from chatrl.services.core.checkpoint import latest_checkpoint, load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.core.formats import load_rankings
from chatrl.services.core.scoring import last_token_scalar, pair_ids
from chatrl.services.trainer.stages import pretrain, reward_model, sft
from chatrl.services.trainer.stages.common import (
    Cancelled,
    Reporter,
    model_from_checkpoint,
    run_dir,
    stage_dir,
    tokenizer_from_checkpoint,
)

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")


def test_pretrain_sft_reward_via_cli(micro_overrides, capsys):
    sets = sum((["--set", o] for o in micro_overrides), [])
    assert main(["train", "pretrain", "-c", MICRO, *sets]) == 0
    assert main(["train", "sft", "-c", MICRO, *sets]) == 0
    assert main(["train", "reward", "-c", MICRO, *sets]) == 0
    cfg = load_config(MICRO, micro_overrides)
    pre = load_checkpoint(stage_dir(cfg, "pretrain"))
    s = load_checkpoint(stage_dir(cfg, "sft"))
    rm = load_checkpoint(stage_dir(cfg, "reward"))
    m = pre.manifest["meta"]["metrics"]
    # losses fall: well below the uniform-prediction loss log(vocab)
    import math

    assert m["eval_loss"] < math.log(cfg.tokenizer.vocab_size) - 1.0
    sm = s.manifest["meta"]["metrics"]
    assert sm["eval_loss"] < sm["eval_loss_before"]
    rmm = rm.manifest["meta"]["metrics"]
    assert rmm["eval_accuracy"] >= 0.75  # the synthetic rankings are easy (warm > hostile > unfinished)
    assert "scalar_head.weight" in rm.model_state()
    # the bias centres the scores of the ranked responses: with it, they average exactly 0
    rankings = load_rankings(Path(cfg.data.rankings_file))
    model, tok = model_from_checkpoint(rm, scalar_head=True), tokenizer_from_checkpoint(rm)
    seqs = [pair_ids(tok, r.prompt, resp, fin, model.cfg.max_seq_len)
            for r in rankings for resp, fin in zip(r.responses, r.finished)]
    with torch.no_grad():
        scores = last_token_scalar(model.eval(), seqs, tok.pad_id, "fp32", "cpu")
    assert len(seqs) == 120 and rm.manifest["meta"]["reward_bias"] == rmm["reward_bias"]
    assert abs(float(scores.double().mean()) + rmm["reward_bias"]) < 1e-5
    # each stage starts from the previous one's tokenizer
    assert (s.path / "tokenizer.json").read_text() == (pre.path / "tokenizer.json").read_text()
    out = capsys.readouterr().out
    assert "pretrain: checkpoint" in out and "reward: checkpoint" in out


def test_sft_requires_pretrain(micro_overrides, capsys):
    sets = sum((["--set", o] for o in micro_overrides), [])
    assert main(["train", "sft", "-c", MICRO, *sets]) == 2
    assert "run `chatrl train pretrain` first" in capsys.readouterr().err


def test_bad_config_field_is_named(micro_overrides, capsys):
    assert main(["train", "pretrain", "-c", MICRO, "--set", "pretrain.stepz=3"]) == 2
    assert "pretrain.stepz" in capsys.readouterr().err


class StopAt(Reporter):
    def __init__(self, stop_step: int) -> None:
        super().__init__(quiet=True)
        self.stop_step = stop_step

    def progress(self, stage, step, total):
        if step == self.stop_step:
            self.cancel_event.set()


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a).model_state(), load_checkpoint(b).model_state()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


def test_pretrain_resume_matches_uninterrupted(micro_overrides, tmp_path):
    cfg_a = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'a'}"])
    cfg_b = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'b'}"])
    ref = pretrain.run(cfg_a, Reporter(quiet=True))
    with pytest.raises(Cancelled):
        pretrain.run(cfg_b, StopAt(12))  # checkpoint at step 10 exists, step 11-12 are lost
    ck = latest_checkpoint(stage_dir(cfg_b, "pretrain"))
    assert ck.step == 10 and not ck.manifest["meta"]["final"]
    res = pretrain.run(load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'b'}"]), Reporter(quiet=True))
    _same_weights(ref.checkpoint, res.checkpoint)


def test_reward_model_resume_matches_uninterrupted(micro_overrides, tmp_path):
    # both runs start from the same SFT model; 40 rankings, 8 held out, batch 4: 8 steps per epoch, a
    # resumable checkpoint after epoch 1 (step 8), 16 steps in all
    cfg = load_config(MICRO, micro_overrides)
    pretrain.run(cfg, Reporter(quiet=True))
    sft_ckpt = str(sft.run(cfg, Reporter(quiet=True)).checkpoint)
    cfg_a = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'a'}"])
    cfg_b = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'b'}"])
    ref = reward_model.run(cfg_a, Reporter(quiet=True), init=sft_ckpt)
    with pytest.raises(Cancelled):
        reward_model.run(cfg_b, StopAt(12), init=sft_ckpt)
    ck = latest_checkpoint(stage_dir(cfg_b, "reward"))
    assert ck.step == 8 and not ck.manifest["meta"]["final"]
    res = reward_model.run(cfg_b, Reporter(quiet=True), init=sft_ckpt)
    assert load_checkpoint(res.checkpoint).step == 16
    _same_weights(ref.checkpoint, res.checkpoint)
    # the accuracy before training survives the interruption; everything measured after it is the same
    assert res.metrics["eval_accuracy_before"] == ref.metrics["eval_accuracy_before"]
    assert res.metrics["reward_bias"] == pytest.approx(ref.metrics["reward_bias"], abs=1e-5)


def test_train_reward_with_the_simulated_labeler(micro_overrides, tiny_gold, capsys):
    # no rankings file: `chatrl train reward` samples K=3 responses from the SFT model for 24 prompts, two
    # simulated labelers rank them through the in-process feedback store, the RM trains on what the
    # store holds
    over = [o for o in micro_overrides if not o.startswith("data.rankings_file")] + [f"data.gold_file={tiny_gold}"]
    sets = sum((["--set", o] for o in over), [])
    for stage in ("pretrain", "sft", "reward"):
        assert main(["train", stage, "-c", MICRO, *sets]) == 0
    cfg = load_config(MICRO, over)
    with FeedbackStore(run_dir(cfg) / "feedback.db") as store:
        stored = list(store.export("rankings"))
        assert store.stats()["open_tasks"] == 0
    assert len(stored) == cfg.reward.num_prompts == 24
    assert {r["labeler_id"] for r in stored} == {"simulated-labeler-0", "simulated-labeler-1"}
    assert all(len(r["responses"]) == 3 and sorted(r["ranking"]) == [0, 1, 2] for r in stored)
    snapshot = load_rankings(run_dir(cfg) / "data" / "rankings_reward.jsonl")  # what the RM trained on
    assert [(r.prompt, r.responses, r.ranking) for r in snapshot] == [
        (r["prompt"], r["responses"], r["ranking"]) for r in stored]
    rm = load_checkpoint(stage_dir(cfg, "reward"))
    assert rm.manifest["meta"]["num_rankings"] == 24
    assert "reward: checkpoint" in capsys.readouterr().out


def test_reward_stage_without_rankings_or_labeler_names_both(micro_overrides):
    over = [o for o in micro_overrides if not o.startswith("data.rankings_file")]
    cfg = load_config(MICRO, over)
    pretrain.run(cfg, Reporter(quiet=True))
    sft.run(cfg, Reporter(quiet=True))
    with pytest.raises(FileNotFoundError, match="data.rankings_file .* data.gold_file"):
        reward_model.run(cfg, Reporter(quiet=True))
