"""Shared test fixtures: one torch thread, and a tiny synthetic dataset in the run's formats."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# before anything imports Ray: local Ray binds and advertises loopback only
os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "disabled"})
torch.set_num_threads(1)

SUBJECTS = ["the film", "this movie", "the story", "the cast", "the ending", "the music", "the script"]
GOOD = ["was warm and funny", "is a delight", "felt honest and moving", "is wonderful", "was charming"]
BAD = ["was dull", "is a mess", "felt long and empty", "is tedious", "was clumsy"]
QUESTIONS = ["What did you think of the movie?", "How was the film?", "Tell me about the story.",
             "Did you like the cast?", "Write a short review."]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(GOOD + BAD)}."


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """A synthetic corpus, demonstrations, prompts and rankings (best-first) in the on-disk formats."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    docs = [" ".join(sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(300)]
    (d / "corpus.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n")
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(120):
            q = rng.choice(QUESTIONS)
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": sentence(rng)}]}) + "\n")
    for name, n in (("prompts.jsonl", 40), ("eval_prompts.jsonl", 20)):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": rng.choice(QUESTIONS)}) + "\n")
    with open(d / "rankings.jsonl", "w") as f:
        for _ in range(40):
            good = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(GOOD)}."
            bad = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(BAD)}."
            meh = f"{rng.choice(SUBJECTS)}"
            responses = [meh, good, bad]
            f.write(json.dumps({"prompt": rng.choice(QUESTIONS), "responses": responses, "ranking": [1, 2, 0],
                                "finished": [False, True, True]}) + "\n")
    return {"dir": d, "corpus": d / "corpus.txt", "sft": d / "sft.jsonl", "prompts": d / "prompts.jsonl",
            "eval_prompts": d / "eval_prompts.jsonl", "rankings": d / "rankings.jsonl"}


@pytest.fixture()
def micro_overrides(tiny_data, tmp_path) -> list[str]:
    """--set overrides pointing configs/micro.yaml at the synthetic data and a fresh run dir."""
    from kit import micro_data_overrides

    return [f"run_dir={tmp_path / 'run'}", *micro_data_overrides(tiny_data)]


@pytest.fixture(scope="session")
def micro_run(tiny_data, tmp_path_factory):
    """pretrain → SFT → reward model on the micro config, once per test session: (cfg, {stage: ckpt dir})."""
    from kit import micro_config

    from chatrl.services.trainer.stages import pretrain, reward_model, sft
    from chatrl.services.trainer.stages.common import Reporter

    cfg = micro_config(tiny_data, tmp_path_factory.mktemp("micro_run"))
    rep = Reporter(quiet=True)
    out = {"pretrain": pretrain.run(cfg, rep).checkpoint, "sft": sft.run(cfg, rep).checkpoint,
           "reward": reward_model.run(cfg, rep).checkpoint}
    return cfg, out


@pytest.fixture(scope="session")
def tiny_gold(tmp_path_factory) -> Path:
    """A simulated labeler fitted on the synthetic sentences (warm = 1, hostile = 0)."""
    from chatrl.services.core.gold import GoldLabeler

    rng = random.Random(1)
    labeled = [(f"{rng.choice(SUBJECTS).capitalize()} {g}.", 1) for g in GOOD for _ in range(6)] + [
        (f"{rng.choice(SUBJECTS).capitalize()} {b}.", 0) for b in BAD for _ in range(6)]
    gold = GoldLabeler.fit(labeled, [t for t, _ in labeled], steps=200)
    path = tmp_path_factory.mktemp("gold") / "gold.npz"
    gold.save(path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """Ray, once per test session, on loopback only, small."""
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    from chatrl.services.trainer.rollout import init_ray

    init_ray(num_cpus=2)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield ray
    ray.shutdown()
