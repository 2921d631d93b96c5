"""A local Hugging Face model through every stage, the way `make demo-real` runs SmolLM2 — here a tiny random
Llama (hidden size 32, 2 layers) built by the kit: the pre-training stage imports it, SFT (loss on assistant
tokens, masks from its own chat template), the reward model on the simulated labelers' K-way rankings through
the feedback service, PPO through policy-inference / reward-scoring / reference-model and Ray workers, with
LoRA (adapter-only weight pushes) and without; kill -9 + resume; export and reload with plain transformers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from kit import CHILD_ENV, MICRO, kill_9_in_ppo_then_resume, tiny_hf_dir  # noqa: E402

from chatrl.services.core.checkpoint import load_checkpoint  # noqa: E402
from chatrl.services.core.config import load_config  # noqa: E402
from chatrl.services.core.lora import state_bytes  # noqa: E402
from chatrl.services.trainer.pipeline import run_pipeline  # noqa: E402
from chatrl.services.trainer.runs import run_endpoints  # noqa: E402
from chatrl.services.trainer.stages import pretrain, sft  # noqa: E402
from chatrl.services.trainer.stages.common import Reporter  # noqa: E402

POLL_S = 0.02
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj, v_proj]"]


def hf_cfg(tiny_data, tiny_gold, model_dir: Path, run_dir: Path, *extra: str):
    """The micro pipeline on an HF model: PPO 4 iterations (checkpoints every 2), the policy service in bf16
    as a GPU overlay would run it is not needed here — everything fp32, one thread."""
    return load_config(MICRO, [
        f"run_dir={run_dir}", f"model.path={model_dir}", f"data.pretrain_files=[{tiny_data['corpus']}]",
        f"data.sft_file={tiny_data['sft']}", f"data.prompts_file={tiny_data['prompts']}",
        f"data.eval_prompts_file={tiny_data['eval_prompts']}", f"data.gold_file={tiny_gold}",
        "ppo.iterations=4", *extra])


class Recorder(Reporter):
    """A quiet reporter that keeps the run's log lines."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def log(self, msg: str) -> None:
        self.lines.append(msg)


def pipeline(cfg) -> dict:
    """The run's result, plus its log lines under ``"log"``."""
    rep = Recorder()
    with run_endpoints(cfg, rep) as endpoints:
        return {**run_pipeline(cfg, rep, endpoints), "log": rep.lines}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def lora_run(tiny_data, tiny_gold, model_dir, tmp_path_factory, ray_session):
    """One uninterrupted LoRA pipeline (the reference of the kill -9 test too): (cfg, result)."""
    cfg = hf_cfg(tiny_data, tiny_gold, model_dir, tmp_path_factory.mktemp("lora") / "run", *LORA)
    return cfg, pipeline(cfg)


def test_every_stage_runs_on_an_hf_model_with_lora_adapters(lora_run, model_dir):
    cfg, res = lora_run
    run = Path(cfg.run_dir)
    # the pre-training stage imported the HF model as is: architecture "hf", the source's weights, no steps
    base = load_checkpoint(run / "checkpoints" / "pretrain")
    assert base.manifest["model_config"]["architecture"] == "hf" and base.step == 0
    assert base.manifest["meta"]["imported_from"] == str(model_dir)
    src = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    assert torch.equal(base.model_state()["hf.model.layers.0.self_attn.q_proj.weight"],
                       src["model.layers.0.self_attn.q_proj.weight"])
    # SFT, RM and PPO trained LoRA adapters on q/v; the base weights stayed the imported ones
    for stage in ("sft", "reward_r0", "ppo_r0"):
        ck = load_checkpoint(run / "checkpoints" / stage)
        assert ck.manifest["model_config"]["lora"]["target_modules"] == ["q_proj", "v_proj"], stage
        w = ck.model_state()
        assert torch.equal(w["hf.model.layers.0.self_attn.q_proj.base_layer.weight"],
                           src["model.layers.0.self_attn.q_proj.weight"]), stage
    assert "scalar_head.weight" in load_checkpoint(run / "checkpoints" / "reward_r0").model_state()
    # every PPO iteration pushed only the adapters: 2 layers × (q, v) × (A [4, 32] + B [out, 4]) in fp32
    ppo = load_checkpoint(run / "checkpoints" / "ppo_r0")
    adapters = {k: v for k, v in ppo.model_state().items() if ".lora_A." in k or ".lora_B." in k}
    assert len(adapters) == 2 * 2 * 2
    hist = res["history"]["ppo_r0"]
    assert [h["push_bytes"] for h in hist] == [float(state_bytes(adapters))] * cfg.ppo.iterations
    assert state_bytes(adapters) < 0.05 * state_bytes(ppo.model_state())
    assert [h["policy_version"] for h in hist] == [2 + i for i in range(cfg.ppo.iterations)]
    assert set(res["evals"]) == {"base (pre-trained)", "SFT", "PPO round 0"}
    # the value model (RM backbone + adapters) sits on the same imported base as the policy: one copy of it
    shared = [line for line in res["log"] if line.startswith("the value model shares")]
    imported_mib = sum(v.numel() * v.element_size() for v in base.model_state().values()) / 2**20
    assert len(shared) == 1 and 0 < float(shared[0].split()[4]) <= imported_mib, shared


def test_policy_service_applies_pushed_adapters_to_its_base(lora_run):
    """policy-inference seeded with the full SFT weights takes an adapter-only push (UpdateWeights, metadata
    ``weights: adapter`` + ``lora_base``): it then serves the SFT base + the PPO adapters, exactly the PPO
    checkpoint; an adapter for another base is refused, naming the field."""
    from chatrl.clients.lib import PolicyClient
    from chatrl.services.core.build import model_from_checkpoint
    from chatrl.services.core.lora import adapter_state_dict
    from chatrl.services.policy.server import PolicyConfig, build
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer.pipeline import policy_metadata
    from chatrl.services.trainer.rl import PolicyServiceSink

    cfg, _ = lora_run
    run = Path(cfg.run_dir)
    sft_ck, ppo_ck = load_checkpoint(run / "checkpoints" / "sft"), load_checkpoint(run / "checkpoints" / "ppo_r0")
    srv, svc = build(ServerConfig(port=0, auth_token_env=""), PolicyConfig())
    client = PolicyClient(srv.address, timeout=120)
    try:
        meta = policy_metadata(sft_ck.path)
        assert meta["lora_base"] == sft_ck.sha256
        sink = PolicyServiceSink(client, meta)
        sink.push(sft_ck.model_state(), 1)  # seeding: the full SFT weights (with its adapters)
        first = svc.engine.latest.model.state_dict()
        ppo_model = model_from_checkpoint(ppo_ck)
        sink.push(adapter_state_dict(ppo_model), 2)
        served = svc.engine.latest
        assert served.version == 2 and served.meta["weights"] == "adapter"
        mine = served.model.state_dict()
        for k, v in ppo_model.state_dict().items():
            assert torch.equal(mine[k], v), k
        # the new version holds only the adapter's bytes: its base tensors are version 1's, not a copy
        for k, v in mine.items():
            assert (v.data_ptr() == first[k].data_ptr()) == ("lora_" not in k), k
        # full pushes after that get weights of their own, and no push overwrites in place a retired model that
        # shares its base with another (version 1 and 2 share one: whichever serves must keep its weights)
        sft = model_from_checkpoint(sft_ck).state_dict()
        for version in (3, 4):
            full = {k: v + version if v.is_floating_point() else v for k, v in ppo_model.state_dict().items()}
            sink.push(full, version)
            now = svc.engine.latest.model.state_dict()
            assert all(now[k].data_ptr() != first[k].data_ptr() for k in now)
            assert all(torch.equal(now[k], full[k]) for k in full)
        assert all(torch.equal(first[k], sft[k]) for k in sft)
        assert all(torch.equal(mine[k], v) for k, v in ppo_model.state_dict().items())
        info = client.model_info()
        assert info.architecture == "hf" and info.tokenizer.kind.startswith("hf:")
        import grpc

        with pytest.raises(grpc.RpcError) as e:
            PolicyServiceSink(client, {**meta, "lora_base": "0" * 64}).push(adapter_state_dict(ppo_model), 5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "lora_base" in e.value.details()
    finally:
        client.close()
        srv.stop(0)
        svc.close()


def test_model_services_hold_an_hf_model_in_bf16_when_asked(lora_run):
    """dtype bf16: policy-inference, reference-model and reward-scoring hold an HF model's weights in bf16 (half
    the memory and the bytes a decode step reads), fp32 pushes and adapters included, and still answer:
    sampled tokens with finite logprobs, reference logprobs and rewards within bf16 rounding of fp32's."""
    from chatrl.clients.lib import PolicyClient
    from chatrl.services.core.build import model_from_checkpoint
    from chatrl.services.core.generate import sequence_logprobs
    from chatrl.services.core.lora import adapter_state_dict
    from chatrl.services.policy.server import PolicyConfig, build
    from chatrl.services.runtime.model_host import ModelHost
    from chatrl.services.runtime.server import ServerConfig
    from chatrl.services.trainer.pipeline import policy_metadata
    from chatrl.services.trainer.rl import PolicyServiceSink

    cfg, _ = lora_run
    run = Path(cfg.run_dir)
    sft_ck, ppo_ck = load_checkpoint(run / "checkpoints" / "sft"), load_checkpoint(run / "checkpoints" / "ppo_r0")
    srv, svc = build(ServerConfig(port=0, auth_token_env=""), PolicyConfig(dtype="bf16"))
    client = PolicyClient(srv.address, timeout=120)
    try:
        sink = PolicyServiceSink(client, policy_metadata(sft_ck.path))
        sink.push(sft_ck.model_state(), 1)
        ppo_model = model_from_checkpoint(ppo_ck)
        sink.push(adapter_state_dict(ppo_model), 2)
        res = client.generate(["How was the film?"], n=2, max_new_tokens=6, temperature=1.0, seed=3)
        assert res.model_version == 2
        served = svc.engine.latest.model
        assert {p.dtype for p in served.parameters()} == {torch.bfloat16}
        for k, v in adapter_state_dict(ppo_model).items():
            assert torch.equal(served.state_dict()[k], v.to(torch.bfloat16)), k
        from chatrl.services.proto.codecs import tensor_from_proto

        for c in res.results[0].completions:
            assert len(c.token_ids) == 6 and np.isfinite(tensor_from_proto(c.logprobs)).all()
    finally:
        client.close()
        srv.stop(0)
        svc.close()
    ref32, ref16 = (ModelHost("reference-model", scalar_head=False, dtype=d).load(str(ppo_ck.path)).model
                    for d in ("fp32", "bf16"))
    assert {p.dtype for p in ref16.parameters()} == {torch.bfloat16}
    seqs = [list(range(5, 25)), list(range(30, 42))]
    lp32, lp16 = (sequence_logprobs(m, seqs) for m in (ref32, ref16))
    diff = torch.tensor([a - b for x, y in zip(lp32, lp16) for a, b in zip(x, y)]).abs()
    assert diff.mean() < 0.1, diff
    rm32, rm16 = (ModelHost("reward-model", scalar_head=True, dtype=d).load(str(run / "checkpoints" / "reward_r0"))
                  .model for d in ("fp32", "bf16"))
    assert rm16.scalar_head.weight.dtype == torch.bfloat16
    ids = torch.tensor(seqs[0])[None]
    assert abs(float(rm32(ids).scalar[0, -1]) - float(rm16(ids).scalar[0, -1])) < 0.05


def test_ppo_without_lora_trains_and_pushes_every_weight(tiny_data, tiny_gold, model_dir, tmp_path, ray_session):
    cfg = hf_cfg(tiny_data, tiny_gold, model_dir, tmp_path / "run", "ppo.iterations=2", "pipeline.eval_prompts=4")
    res = pipeline(cfg)
    ppo = load_checkpoint(tmp_path / "run" / "checkpoints" / "ppo_r0")
    assert "lora" not in ppo.manifest["model_config"]
    full = state_bytes(ppo.model_state())
    assert [h["push_bytes"] for h in res["history"]["ppo_r0"]] == [float(full)] * 2
    src = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    moved = ppo.model_state()["hf.model.layers.0.mlp.up_proj.weight"] - src["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 0  # every weight trains without LoRA


@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_critic_free_rl_and_dpo_train_the_adapters_of_an_hf_model(lora_run, tiny_data, tiny_gold, model_dir,
                                                                   tmp_path, method):
    """The comparison's other methods on an HF model with LoRA, from the LoRA run's SFT model, rankings and RM
    (``pipeline.reuse_from``): GRPO through the services with no value model anywhere and adapter-only pushes,
    DPO on the rankings against the frozen SFT reference. Each moves the adapters and nothing else."""
    from chatrl.services.trainer.pipeline import round_stage

    ref_cfg, _ = lora_run
    extra = ["pipeline.method=dpo", "dpo.epochs=1", "dpo.lr=1e-3"] if method == "dpo" else [
        "ppo.algorithm=grpo", "ppo.iterations=2"]
    cfg = hf_cfg(tiny_data, tiny_gold, model_dir, tmp_path / "run", *LORA, f"pipeline.reuse_from={ref_cfg.run_dir}",
                 "pipeline.eval_prompts=4", *extra)
    res = pipeline(cfg)
    stage, label = round_stage(cfg, 0)
    assert label in res["evals"]
    sft_w = load_checkpoint(Path(ref_cfg.run_dir) / "checkpoints" / "sft").model_state()
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / stage)
    assert not ck.has("value")
    w = ck.model_state()
    assert set(w) == set(sft_w)
    moved = {k for k in w if not torch.equal(w[k], sft_w[k])}
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved), sorted(moved)[:5]
    if method == "grpo":
        adapters = {k: v for k, v in w.items() if ".lora_A." in k or ".lora_B." in k}
        hist = res["history"][stage]
        assert [h["push_bytes"] for h in hist] == [float(state_bytes(adapters))] * 2
        assert all("value_loss" not in h for h in hist)


def test_kill_9_then_resume_an_hf_run(lora_run, tiny_data, tiny_gold, model_dir, tmp_path):
    """kill -9 the LoRA pipeline in the middle of PPO; `chatrl pipeline resume` continues from the last
    checkpoints and ends with the uninterrupted run's weights."""
    ref_cfg, ref = lora_run
    cfg = hf_cfg(tiny_data, tiny_gold, model_dir, tmp_path / "b", *LORA)
    assert cfg.to_dict() | {"run_dir": ""} == ref_cfg.to_dict() | {"run_dir": ""}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **CHILD_ENV}
    stderr = kill_9_in_ppo_then_resume(cfg, env)
    resumed = re.search(r"resuming after iteration (\d+)", stderr)
    assert resumed and 2 <= int(resumed.group(1)) < cfg.ppo.iterations, stderr[-3000:]
    wa = load_checkpoint(Path(ref["policy"])).model_state()
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "ppo_r0" / "final").model_state()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), (k, float((wa[k] - wb[k]).abs().max()))


def test_export_reloads_with_plain_transformers(lora_run, tmp_path):
    """`chatrl export` of the PPO policy (LoRA merged) and of the RM; a subprocess that imports no chatrl
    loads the policy with AutoModelForCausalLM and generates the same greedy tokens as chatrl's model."""
    from chatrl.services.core.build import model_from_checkpoint, tokenizer_from_checkpoint
    from chatrl.services.core.generate import SamplingParams, generate

    cfg, _ = lora_run
    run = Path(cfg.run_dir)
    out = tmp_path / "policy-hf"
    cli = [sys.executable, "-m", "chatrl.services.cli"]
    r = subprocess.run([*cli, "export", str(run / "checkpoints" / "policy"), str(out)], capture_output=True,
                       text=True, env={**os.environ, **CHILD_ENV}, timeout=300)
    assert r.returncode == 0, r.stderr
    again = subprocess.run([*cli, "export", str(run / "checkpoints" / "policy"), str(out)], capture_output=True,
                           text=True, env={**os.environ, **CHILD_ENV}, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
    rm_out = tmp_path / "rm-hf"
    r = subprocess.run([*cli, "export", str(run / "checkpoints" / "reward_r0"), str(rm_out), "--kind", "reward"],
                       capture_output=True, text=True, env={**os.environ, **CHILD_ENV}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (rm_out / "scalar_head.safetensors").is_file() and (rm_out / "config.json").is_file()

    ck = load_checkpoint(run / "checkpoints" / "policy")
    model, tok = model_from_checkpoint(ck).eval(), tokenizer_from_checkpoint(ck)
    prompt = tok.prompt_ids("How was the film?")
    ours = generate(model, [prompt], [SamplingParams(max_new_tokens=8, temperature=0.0)], tok.pad_id)[0].tokens
    script = ("import json, sys, torch\n"
              "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "ids = t.apply_chat_template([{'role': 'user', 'content': 'How was the film?'}],"
              " add_generation_prompt=True, tokenize=True)\n"
              "ids = ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids\n"
              "out = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None)\n"
              "print(json.dumps({'prompt': ids, 'new': out[0, len(ids):].tolist()}))\n")
    p = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **CHILD_ENV, "PYTHONPATH": ""}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["prompt"] == prompt
    assert got["new"][: len(ours)] == ours


def test_bad_model_input_is_refused_before_any_work(tiny_data, tiny_gold, model_dir, tmp_path):
    """Each a clear error naming the config field, before a weight is loaded or a checkpoint written."""
    no_template = tmp_path / "no-template"
    tiny_hf_dir(no_template, template=None)
    cases = [
        ([f"model.path={tmp_path / 'missing'}"], r"model.path: .*does not exist"),
        ([f"model.path={tiny_data['dir']}"], r"model.path: .*no config.json"),
        ([f"model.path={no_template}"], r"model.path: .*no chat template"),
        ([f"model.path={model_dir}", "sft.max_len=4096"], r"sft.max_len = 4096 exceeds the context of model.path"),
        ([f"model.path={model_dir}", "lora.enabled=true", "lora.target_modules=[c_attn]"],
         r"lora.target_modules: no linear layer named 'c_attn'"),
    ]
    for extra, msg in cases:
        cfg = hf_cfg(tiny_data, tiny_gold, model_dir, tmp_path / "run", *extra)
        with pytest.raises(ValueError, match=msg):
            pretrain.run(cfg, Reporter(quiet=True))
        assert not (tmp_path / "run" / "checkpoints").exists()
    gpt_lora = load_config(MICRO, [f"run_dir={tmp_path / 'gpt'}", "lora.enabled=true"])
    with pytest.raises(ValueError, match="lora.enabled: LoRA applies to Hugging Face models"):
        sft.run(gpt_lora, Reporter(quiet=True))
