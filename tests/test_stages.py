"""The three offline training stages end to end on a micro config, plus resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatrl.clients.cli import main
from chatrl.services.core.checkpoint import latest_checkpoint, load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.trainer.stages import pretrain, reward_model, sft
from chatrl.services.trainer.stages.common import Cancelled, Reporter, stage_dir

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
    # the bias centres the scores of the ranked responses
    assert abs(rmm["reward_bias"]) < 100
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


def test_pretrain_resume_matches_uninterrupted(micro_overrides, tmp_path):
    cfg_a = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'a'}"])
    cfg_b = load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'b'}"])
    ref = pretrain.run(cfg_a, Reporter(quiet=True))
    with pytest.raises(Cancelled):
        pretrain.run(cfg_b, StopAt(12))  # checkpoint at step 10 exists, step 11-12 are lost
    ck = latest_checkpoint(stage_dir(cfg_b, "pretrain"))
    assert ck.step == 10 and not ck.manifest["meta"]["final"]
    res = pretrain.run(load_config(MICRO, micro_overrides + [f"run_dir={tmp_path / 'b'}"]), Reporter(quiet=True))
    wa = load_checkpoint(ref.checkpoint).model_state()
    wb = load_checkpoint(res.checkpoint).model_state()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-5, k


def test_reward_stage_from_simulated_labeler_is_used_when_no_rankings(micro_overrides, tmp_path):
    over = [o for o in micro_overrides if not o.startswith("data.rankings_file")]
    cfg = load_config(MICRO, over)
    pretrain.run(cfg, Reporter(quiet=True))
    sft.run(cfg, Reporter(quiet=True))
    with pytest.raises(FileNotFoundError, match="rankings_file"):
        reward_model.run(cfg, Reporter(quiet=True))
    assert json.loads(json.dumps(cfg.to_dict()))["data"]["rankings_file"] == ""
