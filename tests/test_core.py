"""Core: GPT + KV cache, sampling, tokenizer + chat template, checkpoints, data formats, config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from chatrl.services.core.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from chatrl.services.core.config import ConfigError, config_from_yaml_text
from chatrl.services.core.formats import (
    FormatError,
    load_pairs,
    load_prompts,
    load_rankings,
    load_sft,
    prompt_text,
    read_corpus,
)
from chatrl.services.core.generate import (
    SamplingParams,
    generate,
    left_pad,
    sequence_logprobs,
    truncate_logits,
)
from chatrl.services.core.model import GPT, GPTConfig, KVCache, autocast
from chatrl.services.core.tokenizer import ChatTokenizer

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=48)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


@pytest.fixture(scope="module")
def tok():
    texts = ["the film was warm and funny", "what did you think of the movie", "hello there, how are you?"] * 20
    return ChatTokenizer.train(texts, vocab_size=300, min_frequency=1)


# --- model ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_left_padding_does_not_change_logits(positions):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**{**CFG.to_dict(), "positions": positions})).eval()
    a, b = [5, 6, 7, 8], [9, 10]
    ids, mask = left_pad([a, b], 0)
    out = m(ids, mask).logits
    assert torch.allclose(out[0], m(torch.tensor([a])).logits[0], atol=1e-5)
    assert torch.allclose(out[1, -2:], m(torch.tensor([b])).logits[0], atol=1e-5)


def test_kv_cache_matches_full_forward_and_supports_join_and_leave(model):
    seq = [1, 2, 3, 4, 5, 6, 7]
    full = model(torch.tensor([seq])).logits[0]
    out = model(torch.tensor([seq[:3]]), use_cache=True)
    cache = out.cache
    for i in range(3, 7):
        out = model(torch.tensor([[seq[i]]]), cache=cache, use_cache=True)
        cache = out.cache
        assert torch.allclose(out.logits[0, -1], full[i], atol=1e-5)
    # a new request joins a batch mid-decoding (different lengths), then the first leaves
    other = [9, 10]
    c2 = model(torch.tensor([other]), use_cache=True).cache
    merged = KVCache.merge(cache, c2)
    step = model(torch.tensor([[11], [12]]), cache=merged, use_cache=True)
    assert torch.allclose(step.logits[0, -1], model(torch.tensor([seq + [11]])).logits[0, -1], atol=1e-5)
    assert torch.allclose(step.logits[1, -1], model(torch.tensor([other + [12]])).logits[0, -1], atol=1e-5)
    left = step.cache.select([1])
    assert left.length == 3  # columns only the departed row used are dropped
    nxt = model(torch.tensor([[13]]), cache=left, use_cache=True)
    assert torch.allclose(nxt.logits[0, -1], model(torch.tensor([other + [12, 13]])).logits[0, -1], atol=1e-5)


def test_kv_cache_writes_in_place_yet_branches_stay_independent(model):
    """Decoding writes into preallocated columns (no copy per token), past the spare capacity too; two
    continuations of one prefix each see only their own tokens."""
    prefix = [1, 2, 3]
    base = model(torch.tensor([prefix]), use_cache=True).cache
    a = model(torch.tensor([[4]]), cache=base, use_cache=True)
    b = model(torch.tensor([[5]]), cache=base, use_cache=True)  # base is shared past its end: b copies
    assert a.cache.keys[0].data_ptr() == base.keys[0].data_ptr()  # a extended in place
    assert b.cache.keys[0].data_ptr() != base.keys[0].data_ptr()
    assert torch.allclose(a.logits[0, -1], model(torch.tensor([prefix + [4]])).logits[0, -1], atol=1e-5)
    assert torch.allclose(b.logits[0, -1], model(torch.tensor([prefix + [5]])).logits[0, -1], atol=1e-5)
    nxt = model(torch.tensor([[6]]), cache=a.cache, use_cache=True)  # a is still intact after b
    assert torch.allclose(nxt.logits[0, -1], model(torch.tensor([prefix + [4, 6]])).logits[0, -1], atol=1e-5)
    cache, seq = base, list(prefix)
    for i in range(KVCache.SPARE + 5):  # grows past the spare columns
        seq.append(7 + i % 50)
        out = model(torch.tensor([[seq[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
    assert cache.length == len(seq)
    assert torch.allclose(out.logits[0, -1], model(torch.tensor([seq])).logits[0, -1], atol=1e-4)


def test_kv_cache_under_bf16_autocast_matches_full_forward(model):
    seq = [1, 2, 3, 4, 5]
    with autocast("bf16"):
        full = model(torch.tensor([seq])).logits[0, -1].float()
        out = model(torch.tensor([seq[:3]]), use_cache=True)
        for tok in seq[3:]:
            out = model(torch.tensor([[tok]]), cache=out.cache, use_cache=True)
    assert out.cache.keys[0].dtype == torch.bfloat16
    assert torch.allclose(out.logits[0, -1].float(), full, atol=0.05)


def test_scalar_head_and_param_count():
    m = GPT(CFG, scalar_head=True)
    out = m(torch.tensor([[1, 2, 3]]))
    assert out.scalar.shape == (1, 3)
    # counted by hand for vocab 64, d 32, 2 layers, rotary (no position table), tied embeddings:
    #   token embedding 64·32 = 2048 (the tied LM head adds nothing)
    #   per block: ln1 2·32 + qkv (32·96 + 96) + proj (32·32 + 32) + ln2 2·32 + fc (32·128 + 128)
    #              + out (128·32 + 32) = 64 + 3168 + 1056 + 64 + 4224 + 4128 = 12704, × 2 layers = 25408
    #   final norm 2·32 = 64; scalar head 32 + 1 = 33
    assert m.num_params() == 2048 + 25408 + 64 + 33 == 27553
    assert GPT(replace(CFG, tie_embeddings=False)).num_params() == 27520 + 64 * 32  # an LM head of its own
    assert GPT(replace(CFG, positions="learned")).num_params() == 27520 + 48 * 32  # a position table


def test_autocast_refuses_fp16_on_cpu():
    with pytest.raises(ValueError, match="fp16"):
        autocast("fp16", "cpu")
    with autocast("bf16"):
        assert torch.zeros(2, 2).matmul(torch.zeros(2, 2)).dtype == torch.bfloat16


# --- sampling ---------------------------------------------------------------------------------------

def test_truncate_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k2 = truncate_logits(logits, 2, 1.0)
    assert torch.isinf(k2[2:]).all() and torch.isfinite(k2[:2]).all()
    p = truncate_logits(logits, 0, 0.7)  # 0.5 < 0.7 ≤ 0.8: keep the first two
    assert torch.isfinite(p[:2]).all() and torch.isinf(p[2:]).all()
    p1 = truncate_logits(logits, 0, 0.4)  # the first token alone reaches 0.4
    assert torch.isfinite(p1[0]) and torch.isinf(p1[1:]).all()


def test_generate_seeded_stop_and_logprobs(model):
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, SamplingParams(max_new_tokens=6, seed=3))
    b = generate(model, prompts, SamplingParams(max_new_tokens=6, seed=3))
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert all(s.finish_reason == "length" and len(s.tokens) == 6 for s in a)
    # logprobs are those of the model's distribution (temperature 1): recompute them from scratch
    full = sequence_logprobs(model, [prompts[0] + a[0].tokens])[0][len(prompts[0]):]
    assert full == pytest.approx(a[0].logprobs, abs=1e-4)
    # stop on a token: greedy decoding's first token used as the stop token
    g = generate(model, [prompts[0]], SamplingParams(max_new_tokens=5, temperature=0))
    first = g[0].tokens[0]
    s = generate(model, [prompts[0]], SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(first,)))
    assert s[0].tokens == [first] and s[0].finish_reason == "stop"
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 40], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()


# --- tokenizer + chat template ----------------------------------------------------------------------

def test_chat_template_mask_covers_assistant_content_and_end(tok, tmp_path):
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "the film was warm"}]
    ids, mask = tok.render_chat(msgs)
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked[-1] == tok.end_id
    assert tok.decode(masked[:-1]) == "the film was warm"
    assert ids.count(tok.end_id) == 3 and ids[0] == tok.role_ids["system"]
    gen_ids, _ = tok.render_chat(msgs[:2], add_generation_prompt=True)
    assert gen_ids[-1] == tok.assistant_id and gen_ids == tok.prompt_ids("hello there", system="be kind")
    assert tok.response_text(tok.encode("how are you") + [tok.end_id, 5]) == ("how are you", True)
    assert tok.response_text(tok.encode("how")) == ("how", False)
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        tok.render_chat([{"role": "robot", "content": "x"}])
    tok.save(tmp_path / "tokenizer.json")
    again = ChatTokenizer.load(tmp_path)
    assert again.encode("the film was warm") == tok.encode("the film was warm")
    assert tok.decode(tok.encode("Hello, wörld!")) == "Hello, wörld!"  # byte-level: any text round-trips


# --- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_verify_and_latest(tmp_path, model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    model.eval()
    torch.manual_seed(42)
    ck = save_checkpoint(tmp_path, "step-1", stage="pretrain", step=1, model_state=model.state_dict(),
                         model_config=CFG.to_dict(), optimizer_state=opt.state_dict(), meta={"data_position": 1})
    expected_next = torch.rand(3)
    loaded = load_checkpoint(tmp_path)  # via LATEST
    assert loaded.step == 1 and loaded.stage == "pretrain" and len(loaded.sha256) == 64
    st = loaded.model_state()
    for k, v in model.state_dict().items():
        assert torch.equal(st[k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer_state())
    a, b = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(a["exp_avg"], b["exp_avg"]) and float(a["step"]) == float(b["step"])
    loaded.restore_rng()
    assert torch.equal(torch.rand(3), expected_next)
    # tampering is detected, nothing is unpickled
    f = ck.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(ck.path)
    with pytest.raises(CheckpointError, match="manifest.json missing"):
        load_checkpoint(tmp_path / "nope")


# For n = 1, 2, ...: save checkpoint "step-1" (all ones) under root/crash-n, then fork a child that saves
# `name` (all zeros) there and SIGKILLs itself just before its nth file-system step (a safetensors write,
# an fsync, a rename/replace, a removal) — every point at which a crash could interrupt a save — until a
# child gets through. Prints each child's exit status. (One interpreter, forked: torch is imported once.)
_CRASH_EACH_STEP = """
import json, os, shutil, signal, sys, torch
from chatrl.services.core import checkpoint
base, name = sys.argv[1], sys.argv[2]
crash_at, steps = 0, 0
def step(fn):
    def wrapped(*a, **k):
        global steps
        steps += 1
        if steps == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
checkpoint.save_file = step(checkpoint.save_file)
for mod, attr in ((os, "fsync"), (os, "rename"), (os, "replace"), (shutil, "rmtree")):
    setattr(mod, attr, step(getattr(mod, attr)))
statuses = []
while not statuses or statuses[-1] != 0:
    root = os.path.join(base, f"crash-{len(statuses) + 1}")
    checkpoint.save_checkpoint(root, "step-1", stage="sft", step=1, model_state={"w": torch.ones(4)},
                               model_config={}, tokenizer_json="{}")
    pid = os.fork()
    if pid == 0:
        crash_at, steps = len(statuses) + 1, 0
        checkpoint.save_checkpoint(root, name, stage="sft", step=2, model_state={"w": torch.zeros(4)},
                                   model_config={}, tokenizer_json="{}")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
print(json.dumps(statuses))
"""


@pytest.mark.parametrize("same_name", [False, True], ids=["new-name", "same-name"])
def test_checkpoint_save_killed_at_any_step_leaves_old_or_new(tmp_path, same_name):
    """A save killed at any step leaves LATEST on a complete, verified checkpoint — the old one or the
    new one, never a torn mix — and no half-written directory is listed as a checkpoint.

    What this does NOT show: durability across power loss. After SIGKILL the OS page cache still holds
    every byte the child wrote, so the fsyncs are not exercised here; only a crash below the page cache
    (a fault-injecting file system such as dm-flakey or LazyFS) could show that they are in the right
    places."""
    r = subprocess.run([sys.executable, "-c", _CRASH_EACH_STEP, str(tmp_path), "step-1" if same_name else "step-2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    statuses = json.loads(r.stdout)
    assert len(statuses) >= 7 and statuses[:-1] == [-9] * (len(statuses) - 1)  # killed at each step, then done
    for n in range(1, len(statuses) + 1):
        root = tmp_path / f"crash-{n}"
        ck = load_checkpoint(root)  # via LATEST, every file's sha256 verified
        w = ck.model_state()["w"]
        assert (ck.step, w.tolist()) in ((1, [1.0] * 4), (2, [0.0] * 4)), n
        assert [c.path.name for c in list_checkpoints(root)] in (["step-1"], ["step-1", "step-2"]), n
    assert load_checkpoint(tmp_path / f"crash-{len(statuses)}").step == 2  # the save that got through
# --- data formats -----------------------------------------------------------------------------------

def _write(p, lines):
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return p


def test_formats_accept_valid_files(tmp_path):
    (tmp_path / "c.txt").write_text("doc one\n<|endoftext|>\ndoc two\nline\n")
    assert read_corpus([tmp_path / "c.txt"]) == ["doc one", "doc two\nline"]
    sft = _write(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}])
    assert load_sft(sft)[0][1]["content"] == "hello"
    r = _write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}])
    assert load_rankings(r)[0].finished == [True, True, True]
    chat = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And the film?"}]
    pr = _write(tmp_path / "p.jsonl", [{"prompt": "x"}, {"messages": chat}, {"messages": [chat[2]]}])
    assert load_prompts(pr) == ["x", chat, "And the film?"]  # a conversation of one user turn is its text
    assert prompt_text(chat) == "User: Hi.\n\nAssistant: Hello.\n\nUser: And the film?"
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load_pairs(pairs)[0]["chosen"] == "a" and load_pairs(pairs)[0]["finished"] == [True, True]
    pairs = _write(tmp_path / "pairs2.jsonl", [{"prompt": "p", "messages": chat, "chosen": "a", "rejected": "b",
                                                "chosen_finished": True, "rejected_finished": False}])
    assert load_pairs(pairs)[0]["messages"] == chat and load_pairs(pairs)[0]["finished"] == [True, False]


@pytest.mark.parametrize("loader,line,msg", [
    (load_sft, {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    (load_sft, {"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\].role"),
    (load_sft, "{not json", "invalid JSON"),
    (load_rankings, {"prompt": "p", "responses": ["a"], "ranking": [0]}, "K >= 2"),
    (load_rankings, {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, r"duplicates \[0\], missing \[1\]"),
    (load_rankings, {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "finished": [True]}, "'finished'"),
    (load_rankings, {"responses": ["a", "b"], "ranking": [0, 1]}, "missing field 'prompt'"),
    (load_pairs, {"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    (load_prompts, {"prompt": ""}, "'prompt' must not be empty"),
    (load_prompts, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "must end with the user turn"),
])
def test_format_errors_name_file_line_and_field(tmp_path, loader, line, msg):
    ok = {"prompt": "ok", "messages": [{"role": "assistant", "content": "x"}], "responses": ["a", "b"],
          "ranking": [0, 1], "chosen": "a", "rejected": "b"}
    if loader in (load_rankings, load_prompts, load_pairs):  # a prompt conversation ends with a user turn
        ok["messages"] = [{"role": "user", "content": "ok"}]
    p = _write(tmp_path / "bad.jsonl", [ok, line])
    with pytest.raises(FormatError, match=msg) as e:
        loader(p)
    assert f"{p}:2:" in str(e.value)


# --- config -----------------------------------------------------------------------------------------

def test_config_overrides_and_errors():
    cfg = config_from_yaml_text("pretrain: {steps: 5}\nmodel: {d_model: 64, n_head: 4}",
                                ["pretrain.lr=0.01", "data.pretrain_files=[a.txt, b.txt]"])
    assert cfg.pretrain.steps == 5 and cfg.pretrain.lr == 0.01 and cfg.model.d_model == 64
    assert cfg.data.pretrain_files == ["a.txt", "b.txt"]
    with pytest.raises(ConfigError, match="sft.bogus"):
        config_from_yaml_text("sft: {bogus: 1}")
    with pytest.raises(ConfigError, match=r"pretrain.steps: expected int"):
        config_from_yaml_text("pretrain: {steps: many}")
    with pytest.raises(ConfigError, match="divisible"):
        config_from_yaml_text("model: {d_model: 30, n_head: 4}")
    assert math.isclose(config_from_yaml_text("pretrain: {lr: 1}").pretrain.lr, 1.0)


def test_config_inherits_a_base_file(tmp_path):
    from chatrl.services.core.config import load_config

    (tmp_path / "a.yaml").write_text("name: a\nppo: {lr: 1.0e-5, iterations: 7}\nmodel: {d_model: 64}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nppo: {lr: 5e-5}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.name == "b" and cfg.ppo.lr == 5e-5 and cfg.ppo.iterations == 7 and cfg.model.d_model == 64
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")


def test_dtype_auto_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """``dtype: auto`` (configs/tiny.yaml, configs/smollm2.yaml and their service overrides) resolves when a
    config is built: bf16 where the CPU has oneDNN bf16 kernels (a generic bf16 GEMM elsewhere is ≈ 14× slower
    than fp32), fp32 otherwise; an explicit dtype is left alone."""
    from pathlib import Path

    from chatrl.services.core import model as model_mod
    from chatrl.services.core.config import load_config
    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.reference.server import ReferenceConfig
    from chatrl.services.reward.server import RewardConfig

    assert load_config(None, ["dtype=fp32"]).dtype == "fp32" and PolicyConfig(dtype="bf16").dtype == "bf16"
    for native, want in ((False, "fp32"), (True, "bf16")):  # the hardware check is the one thing substituted
        monkeypatch.setattr(model_mod, "native_bf16", lambda device="cpu", native=native: native)
        assert model_mod.resolve_dtype("auto", "cuda:1") == want
        assert load_config(None, ["dtype=auto"]).dtype == want
        assert [c(dtype="auto").dtype for c in (PolicyConfig, RewardConfig, ReferenceConfig)] == [want] * 3
        configs = Path(__file__).resolve().parents[1] / "configs"
        for name in ("tiny.yaml", "smollm2.yaml"):
            cfg = load_config(configs / name)
            assert cfg.dtype == want, name
        assert {o.split("=")[1] for o in cfg.pipeline.service_overrides if ".dtype=" in o} == {"auto"}
