"""Ties and conversation prompts reach training: a labeler's tie is no preference (the reward model's
pairs and DPO's pairs leave it out), and a multi-turn prompt is rendered with the tokenizer's chat
template wherever prompts become token ids (reward model, DPO, PPO rollouts); old rankings files load
unchanged."""

from __future__ import annotations

import json

from kit import hf_tokenizer, tiny_gpt, tiny_tokenizer

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import Ranking, load_rankings
from chatrl.services.core.hf import HFChatTokenizer
from chatrl.services.trainer.rollout import InProcessRollout, shard_prompts
from chatrl.services.trainer.stages import dpo, reward_model

CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "how are you?"},
        {"role": "user", "content": "the film was warm"}]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_old_rankings_file_loads_as_strict_single_turn_rankings_and_writes_back_the_same(tmp_path):
    row = {"prompt": "How was the film?", "responses": ["a", "b", "c"], "ranking": [1, 2, 0],
           "finished": [False, True, True]}
    (r,) = load_rankings(write(tmp_path / "old.jsonl", [row]))
    assert r.tied_with_next == [] and r.messages is None and r.chat == "How was the film?"
    assert r.pairs() == [(1, 2), (1, 0), (2, 0)]
    assert r.to_dict() == row


def test_an_exported_row_carries_its_ties_and_its_conversation(tmp_path):
    # what FeedbackStore.export_rankings writes: messages for every row, tied_with_next of K-1
    rows = [{"prompt": "User: hello there\n\nAssistant: how are you?\n\nUser: the film was warm", "messages": CHAT,
             "responses": ["a", "b", "c", "d"], "ranking": [3, 2, 0, 1], "tied_with_next": [False, True, False]},
            {"prompt": "How was it?", "messages": [{"role": "user", "content": "How was it?"}],
             "responses": ["a", "b"], "ranking": [0, 1], "tied_with_next": [False]}]
    multi, single = load_rankings(write(tmp_path / "export.jsonl", rows))
    assert multi.messages == CHAT and multi.chat == CHAT and multi.tied_with_next == [False, True, False]
    # tiers {3}, {2, 0}, {1}: five pairs, none between 2 and 0
    assert multi.pairs() == [(3, 2), (3, 0), (3, 1), (2, 1), (0, 1)]
    assert single.messages is None and single.chat == "How was it?" and single.tied_with_next == []
    assert load_rankings(write(tmp_path / "again.jsonl", [multi.to_dict()]))[0] == multi


def test_a_conversation_must_end_with_the_user_turn_the_responses_answer(tmp_path):
    import pytest

    from chatrl.services.core.formats import FormatError

    row = {"prompt": "p", "messages": CHAT[:2], "responses": ["a", "b"], "ranking": [0, 1]}
    with pytest.raises(FormatError, match=r"bad\.jsonl:1: messages must end with the user turn"):
        load_rankings(write(tmp_path / "bad.jsonl", [row]))
    row = {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "tied_with_next": [True, False]}
    with pytest.raises(FormatError, match=r"field 'tied_with_next' must be a list of 1 booleans"):
        load_rankings(write(tmp_path / "bad.jsonl", [row]))


def test_both_tokenizers_render_a_conversation_prompt_with_their_chat_template():
    for tok in (tiny_tokenizer(), HFChatTokenizer(hf_tokenizer())):
        assert tok.prompt_ids(CHAT) == tok.render_chat(CHAT, add_generation_prompt=True)[0]
        assert tok.prompt_ids("hi") == tok.render_chat([{"role": "user", "content": "hi"}], True)[0]
    hf = hf_tokenizer()
    text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)  # "<|user|>hello there<|end|>\n…"
    assert HFChatTokenizer(hf).prompt_ids(CHAT) == hf.encode(text, add_special_tokens=False)


def test_the_reward_model_sees_the_conversation_and_gets_no_pair_from_a_tie():
    tok = tiny_tokenizer()
    r = Ranking("flattened", ["warm", "dull", "funny"], [0, 2, 1], [True, True, False], [True, True], CHAT)
    ((seqs, ranking, ties),) = reward_model.encode_rankings(tok, [r], 64)
    prompt = tok.render_chat(CHAT, add_generation_prompt=True)[0]
    assert seqs[0] == prompt + tok.encode("warm") + [tok.end_id] and seqs[2] == prompt + tok.encode("funny")
    assert ranking == [0, 2, 1] and ties == [True, True]
    # every response tied: no pair, loss 0 — a strict ranking of the same responses does learn
    rm = tiny_gpt(tok.vocab_size, scalar_head=True)
    loss, acc, _ = reward_model.rm_batch_loss(rm, [(seqs, ranking, ties)], tok.pad_id, RunConfig())
    assert loss.item() == 0.0 and acc == 0.0
    loss, _, _ = reward_model.rm_batch_loss(rm, [(seqs, ranking, [False, False])], tok.pad_id, RunConfig())
    assert loss.item() > 0.0


def test_dpo_pairs_skip_ties_and_start_with_the_rendered_conversation():
    tok = tiny_tokenizer()
    r = Ranking("flattened", ["warm", "dull", "funny"], [0, 2, 1], [True, True, True], [True, False], CHAT)
    (pairs,) = dpo.encode_pairs(tok, [r], 64, lambda seqs, starts: [float(len(s) - st) for s, st in zip(seqs, starts)])
    prompt = tok.render_chat(CHAT, add_generation_prompt=True)[0]
    text = {tuple(prompt + tok.encode(x) + [tok.end_id]): x for x in r.responses}
    # tiers {warm, funny}, {dull}: no warm/funny pair
    assert [(text[tuple(c)], text[tuple(j)]) for (c, _), (j, _), _, _ in pairs] == [("warm", "dull"), ("funny", "dull")]
    assert all(st == len(prompt) for (_, st), _, _, _ in pairs)


def test_an_in_process_rollout_samples_after_the_rendered_conversation():
    tok = tiny_tokenizer()
    policy = tiny_gpt(tok.vocab_size, seed=1)
    seen = []
    src = InProcessRollout(policy, tiny_gpt(tok.vocab_size, seed=1), lambda p, r: seen.append(p) or 0.0, tok,
                           samples_per_prompt=2, max_new_tokens=4)
    exps = src.submit([CHAT, "hello there"], version=0, seed=3).result()
    rendered = tok.render_chat(CHAT, add_generation_prompt=True)[0]
    assert [e.prompt_ids for e in exps if e.prompt == CHAT] == [rendered] * 2
    assert all(p == rendered for p in seen[:2])  # the reward scores the same ids


def test_ray_shards_keep_each_conversation_whole():
    prompts = [CHAT, CHAT[2:], CHAT, "text"]
    assert shard_prompts(prompts, 2) == [[CHAT, CHAT[2:]], [CHAT, "text"]]
    assert shard_prompts([CHAT, CHAT], 2) == [[CHAT], [CHAT]]
    assert sum(shard_prompts(prompts, 3), []) == prompts

