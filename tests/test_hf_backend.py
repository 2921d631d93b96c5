"""The optional Hugging Face backend (services/core/hf.py) on tiny randomly initialised GPT-2 and Llama
models and a locally trained tokenizer saved to temporary directories — never the hub."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from chatrl.services.core.generate import SamplingParams, generate, left_pad, sequence_logprobs  # noqa: E402
from chatrl.services.core.hf import HFCausalLM, HFChatTokenizer, is_hf_dir, load_hf  # noqa: E402
from chatrl.services.core.model import KVCache  # noqa: E402
from chatrl.services.core.scoring import last_token_scalar  # noqa: E402
from chatrl.services.core.tokenizer import SPECIAL_TOKENS, ChatTokenizer  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEXTS = ["the film was warm and funny", "what did you think of the movie?", "hello there, how are you?",
         "the story is a delight", "the cast felt honest and moving"] * 10
# chatrl's template plus a newline after each turn (the mask must not cover it)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ARCHS = ["gpt2", "llama"]


def train_bpe(special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=special,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=tr)
    return tok


def wrap(tok: Tokenizer, template: str | None, **special):
    ht = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if template is not None:
        ht.chat_template = template
    return ht


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, bpe) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    ht = wrap(bpe, TEMPLATE, eos_token="<|endoftext|>", pad_token="<|pad|>",
              additional_special_tokens=SPECIAL_TOKENS[2:])
    v = len(ht)
    ids = dict(eos_token_id=ht.eos_token_id, bos_token_id=ht.eos_token_id, pad_token_id=ht.pad_token_id)
    torch.manual_seed(0)
    cfgs = {  # large init → peaked logits, so greedy decoding has no near-ties
        "gpt2": transformers.GPT2Config(vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                        initializer_range=0.3, **ids),
        "llama": transformers.LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,  # GQA
                                          max_position_embeddings=64, initializer_range=0.3, **ids),
    }
    out = {}
    for name, cfg in cfgs.items():
        d = root / name
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d))
        ht.save_pretrained(str(d))
        out[name] = str(d)
    return out


@pytest.fixture(scope="module")
def loaded(dirs) -> dict[str, tuple[HFCausalLM, HFChatTokenizer]]:
    return {name: load_hf(d) for name, d in dirs.items()}


def rand_seqs(v: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, v, (n,), generator=g).tolist() for n in lens]


def hf_logits(model: HFCausalLM, seq: list[int]) -> torch.Tensor:
    return model.hf(torch.tensor([seq])).logits[0]


def test_is_hf_dir(dirs, tmp_path):
    assert all(is_hf_dir(d) for d in dirs.values())
    assert is_hf_dir("file://" + dirs["gpt2"])
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    assert not is_hf_dir(tmp_path)
    with pytest.raises(ValueError):
        HFCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_logits_match_hf_forward(loaded, arch):
    model, tok = loaded[arch]
    assert model.cfg.max_seq_len == 64 and model.cfg.vocab_size == tok.vocab_size
    assert json.loads(json.dumps(model.cfg.to_dict()))["architecture"] == "hf"
    assert model.scalar_head is None and model.num_params() > 0
    seqs = rand_seqs(model.cfg.vocab_size, [9, 5, 1])
    ids, mask = left_pad(seqs, tok.pad_id)
    out = model(ids, mask)
    rids = torch.full_like(ids, tok.pad_id)
    rmask = torch.zeros_like(mask)
    for i, s in enumerate(seqs):
        rids[i, : len(s)] = torch.tensor(s)
        rmask[i, : len(s)] = 1
    rout = model(rids, rmask, lm_head=False)  # right padding, no LM head
    assert rout.logits is None
    for i, s in enumerate(seqs):
        ref = hf_logits(model, s)
        torch.testing.assert_close(out.logits[i, -len(s):], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rout.hidden[i, : len(s)], out.hidden[i, -len(s):], atol=1e-5, rtol=1e-5)
    # the hidden state is what the LM head reads
    torch.testing.assert_close(model.hf.get_output_embeddings()(out.hidden), out.logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_kv_cache_decoding_with_join_and_leave(loaded, arch):
    model, tok = loaded[arch]
    v = model.cfg.vocab_size
    seqs = rand_seqs(v, [7, 3], seed=1)  # batch A, left-padded
    late = rand_seqs(v, [5], seed=2)[0]  # joins after two steps
    out = model(*left_pad(seqs, tok.pad_id), use_cache=True)
    logits, cache = out.logits[:, -1], out.cache

    def check(rows: list[list[int]], lg: torch.Tensor) -> None:
        for r, s in enumerate(rows):
            torch.testing.assert_close(lg[r], hf_logits(model, s)[-1], atol=1e-4, rtol=1e-4)

    check(seqs, logits)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        nxt = torch.randint(6, v, (len(seqs),), generator=g).tolist()
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        out = model(torch.tensor(nxt)[:, None], None, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        check(seqs, logits)
        if step == 1:  # a new row joins (its cache is shorter: left-padded by merge)
            new = model(*left_pad([late], tok.pad_id), use_cache=True)
            check([late], new.logits[:, -1])
            cache = KVCache.merge(cache, new.cache)
            seqs.append(late)
        if step == 3:  # the first row leaves
            cache = cache.select([1, 2])
            seqs = seqs[1:]
    assert cache.batch_size == 2 and cache.keys[0].shape[1] == model.cfg.n_kv_head


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_logprobs_and_greedy_match_hf(loaded, arch):
    model, tok = loaded[arch]
    prompts = [tok.prompt_ids("what did you think of the movie?"), tok.prompt_ids("hello"),
               tok.encode("the film was")]
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=i) for i, n in enumerate((8, 5, 10))]
    samples = generate(model, prompts, params, pad_id=tok.pad_id)
    lps = sequence_logprobs(model, [p + s.tokens for p, s in zip(prompts, samples)], pad_id=tok.pad_id)
    for p, s, lp in zip(prompts, samples, lps):
        assert len(s.tokens) == len(s.logprobs) > 0
        torch.testing.assert_close(torch.tensor(lp[len(p):]), torch.tensor(s.logprobs), atol=1e-4, rtol=1e-4)
    # greedy decoding (batched, left-padded, rows leaving at their stop token) equals HF's generate
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0,
                                                     stop_token_ids=(tok.eot_id,)), pad_id=tok.pad_id)
    for p, s in zip(prompts, greedy):
        ref = model.hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, eos_token_id=tok.eot_id,
                                pad_token_id=tok.pad_id)[0, len(p):].tolist()
        if tok.eot_id in ref:
            ref = ref[: ref.index(tok.eot_id) + 1]
        assert s.tokens == ref


def test_render_chat_mask(loaded, bpe):
    _, tok = loaded["llama"]
    assert tok.end_id == tok.hf.convert_tokens_to_ids("<|end|>")  # detected from the template
    assert tok.eot_id == tok.hf.eos_token_id and tok.pad_id == tok.hf.pad_token_id
    assert tok.assistant_id == tok.hf.convert_tokens_to_ids("<|assistant|>")
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "the film was warm"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "funny, how are you?"}]
    ids, mask = tok.render_chat(msgs)
    assert len(ids) == len(mask) and tok.decode(ids, skip_special=False) == tok._render(msgs, False)
    # the masked tokens are exactly each assistant content followed by <|end|>
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r, skip_special=False) for r in runs] == [
        "the film was warm<|end|>", "funny, how are you?<|end|>"]
    p = tok.prompt_ids("hello there", system="be kind")
    assert p[-1] == tok.assistant_id and p == tok.render_chat(msgs[:2], add_generation_prompt=True)[0]
    assert tok.response_text(tok.encode("the film") + [tok.end_id, 7]) == ("the film", True)
    assert tok.response_text(tok.encode("the film")) == ("the film", False)
    assert tok.encode_batch(["the film", "hello"]) == [tok.encode("the film"), tok.encode("hello")]
    assert json.loads(tok.to_str())["end_id"] == tok.end_id

    # no chat template but chatrl's special tokens: identical to ChatTokenizer
    plain = HFChatTokenizer(wrap(bpe, None, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                 additional_special_tokens=SPECIAL_TOKENS[2:]))
    native = ChatTokenizer(bpe)
    assert plain.render_chat(msgs) == native.render_chat(msgs)
    assert plain.prompt_ids("hi") == native.prompt_ids("hi")
    assert (plain.end_id, plain.pad_id, plain.eot_id) == (native.end_id, native.pad_id, native.eot_id)

    # neither: a "Role: content<eos>" transcript; the mask covers the content and eos
    bare = HFChatTokenizer(wrap(train_bpe(["<|endoftext|>"]), None, eos_token="<|endoftext|>"))
    assert bare.end_id == bare.eot_id == bare.pad_id
    ids, mask = bare.render_chat(msgs[1:3], add_generation_prompt=False)
    masked = [i for i, m in zip(ids, mask) if m]
    assert bare.decode(masked, skip_special=False) == " the film was warm<|endoftext|>"
    assert bare.decode(bare.prompt_ids("hi"), skip_special=False) == "User: hi<|endoftext|>\nAssistant:"


def test_scalar_head_and_state_dict_roundtrip(dirs):
    from chatrl.services.policy.engine import load_state_into

    model, tok = load_hf(dirs["gpt2"], scalar_head=True)
    assert model.scalar_head is not None and model.scalar_head.in_features == model.cfg.d_model
    seqs = rand_seqs(model.cfg.vocab_size, [6, 3], seed=4)
    r = last_token_scalar(model, seqs, tok.pad_id)
    alone = last_token_scalar(model, seqs[1:], tok.pad_id)
    assert r.shape == (2,) and torch.isfinite(r).all()
    torch.testing.assert_close(r[1:], alone, atol=1e-5, rtol=1e-5)
    r.sum().backward()  # trainable end to end
    assert model.scalar_head.weight.grad is not None
    assert next(model.hf.parameters()).grad is not None
    copy = load_state_into(model, {k: v.detach().clone() for k, v in model.state_dict().items()}, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(last_token_scalar(copy, seqs, tok.pad_id), r.detach())


def test_generation_engine_serves_hf_model(loaded):
    from chatrl.services.policy.engine import GenerationEngine

    model, tok = loaded["llama"]
    prompt = tok.prompt_ids("hello there")
    params = SamplingParams(max_new_tokens=6, temperature=0)
    with GenerationEngine(model, tok, version=1, max_batch_size=4) as eng:
        res = eng.submit(prompt, params, n=2).result(timeout=60)
    ref = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0,
                                                   stop_token_ids=(tok.end_id, tok.eot_id)), pad_id=tok.pad_id)[0]
    assert res.model_version == 1
    for c in res.samples:
        assert c.token_ids == ref.tokens
        assert c.text == tok.decode(ref.tokens)
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(ref.logprobs))


@torch.no_grad()
def test_eager_attention_matches_sdpa(dirs, loaded):
    sdpa, tok = loaded["llama"]
    eager = HFCausalLM.from_pretrained(dirs["llama"], attn_implementation="eager")
    ids, mask = left_pad(rand_seqs(sdpa.cfg.vocab_size, [6, 2], seed=5), tok.pad_id)
    torch.testing.assert_close(eager(ids, mask).logits, sdpa(ids, mask).logits, atol=1e-4, rtol=1e-4)


def test_services_serve_a_local_hf_directory(dirs, loaded):
    """policy-inference and reference-model load an HF directory like a chatrl checkpoint."""
    from chatrl.clients.lib import PolicyClient, ReferenceClient
    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.policy.server import build as build_policy
    from chatrl.services.reference.server import ReferenceConfig
    from chatrl.services.reference.server import build as build_reference
    from chatrl.services.runtime.server import ServerConfig

    psrv, psvc = build_policy(ServerConfig(port=0), PolicyConfig(checkpoint=dirs["llama"]))
    rsrv, rsvc = build_reference(ServerConfig(port=0), ReferenceConfig(checkpoint=dirs["llama"]))
    try:
        with PolicyClient(psrv.address) as p, ReferenceClient(rsrv.address) as r:
            info = p.model_info()
            assert info.loaded and info.architecture == "hf"
            res = p.generate([[5, 6, 7]], n=2, max_new_tokens=4, seed=1)
            comp = res.results[0].completions[0]
            assert 1 <= len(comp.token_ids) <= 4
            lps, _ = r.logprobs([[5, 6, 7] + list(comp.token_ids)], [3])
            from chatrl.services.proto.codecs import tensor_from_proto

            assert torch.allclose(torch.from_numpy(lps[0]), tensor_from_proto(comp.logprobs, as_torch=True), atol=1e-4)
    finally:
        psrv.stop(0)
        rsrv.stop(0)
        rsvc.batcher.close()
        psvc.close()
