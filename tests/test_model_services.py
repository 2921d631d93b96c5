"""reward-scoring and reference-model through real gRPC on loopback, plus the shared runtime:
health transitions, auth, validation errors, metrics, micro-batching, LoadModel versioning."""

from __future__ import annotations

import concurrent.futures as cf
import urllib.request

import grpc
import pytest
import torch

from chatrl.clients.lib import ReferenceClient, RewardClient
from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.scoring import score_pairs
from chatrl.services.proto.chatrl.v1 import reference_pb2, reward_pb2
from chatrl.services.reference.server import ReferenceConfig
from chatrl.services.reference.server import build as build_reference
from chatrl.services.reward.server import RewardConfig
from chatrl.services.reward.server import build as build_reward
from chatrl.services.runtime.server import ServerConfig
from chatrl.services.trainer.stages.common import model_from_checkpoint, tokenizer_from_checkpoint

TOKEN = "s3cret"


@pytest.fixture()
def reward_server(micro_run, monkeypatch):
    monkeypatch.setenv("CHATRL_TEST_TOKEN", TOKEN)
    srv, svc = build_reward(ServerConfig(port=0, metrics_port=0, auth_token_env="CHATRL_TEST_TOKEN"),
                            RewardConfig(checkpoint=str(micro_run[1]["reward"])))
    yield srv, svc
    srv.stop(0)
    svc.batcher.close()


@pytest.fixture()
def reference_server(micro_run):
    srv, svc = build_reference(ServerConfig(port=0, metrics_port=0), ReferenceConfig(checkpoint=str(micro_run[1]["sft"])))
    yield srv, svc
    srv.stop(0)
    svc.batcher.close()


def test_score_matches_in_process_reward_model(reward_server, micro_run):
    srv, _ = reward_server
    ck = load_checkpoint(micro_run[1]["reward"])
    model, tok = model_from_checkpoint(ck, scalar_head=True), tokenizer_from_checkpoint(ck)
    bias = ck.manifest["meta"]["reward_bias"]
    prompts = ["How was the film?", "Did you like the cast?"]
    responses = ["The film was warm and funny.", "The cast was dull."]
    with RewardClient(srv.address, token="") as c:
        assert c.health() == "SERVING"
        res = c.score(prompts, responses)
        assert res.model_version == 1
        expected = score_pairs(model, tok, prompts, responses, [True, True], bias=bias)
        assert list(res.rewards) == pytest.approx(expected, abs=1e-4)
        # token-id input gives the same reward as text input for the same tokens
        ids = c.score_ids([tok.prompt_ids(prompts[0])], [tok.encode(responses[0]) + [tok.end_id]])
        assert ids.rewards[0] == pytest.approx(res.rewards[0], abs=1e-4)
        info = c.model_info()
        assert info.loaded and info.model_version == 1 and info.parameter_count == model.num_params()


def test_concurrent_scores_are_micro_batched(reward_server):
    srv, svc = reward_server
    with RewardClient(srv.address) as c:
        with cf.ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(c.score, ["How was the film?"], [f"It was fine {i}."]) for i in range(32)]
            res = [f.result() for f in futs]
    assert len(res) == 32 and all(len(r.rewards) == 1 for r in res)
    assert svc.batcher.batches < 32  # several requests shared forward passes


@pytest.mark.parametrize("items,field", [
    ([], "items"),
    ([reward_pb2.ScoreItem(prompt="", response="x")], "items[0].prompt"),
    ([reward_pb2.ScoreItem(prompt="p", response="x"),
      reward_pb2.ScoreItem(prompt_token_ids=[1, 99999], response="x")], "items[1].prompt_token_ids[1]"),
    ([reward_pb2.ScoreItem(prompt="p", response_token_ids=[-1])], "items[0].response_token_ids[0]"),
])
def test_score_validation_names_the_field(reward_server, items, field):
    srv, _ = reward_server
    with RewardClient(srv.address) as c, pytest.raises(grpc.RpcError) as e:
        c._call(c.stub.Score, reward_pb2.ScoreRequest(items=items))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details() and "Traceback" not in e.value.details()
    with RewardClient(srv.address) as c:  # and the server is still alive
        assert c.health() == "SERVING"


def test_load_model_needs_token_and_bumps_version(reward_server, micro_run, tmp_path):
    srv, _ = reward_server
    with RewardClient(srv.address, token="") as anon, pytest.raises(grpc.RpcError) as e:
        anon.load_model(str(micro_run[1]["reward"]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(srv.address, token="wrong") as bad, pytest.raises(grpc.RpcError) as e:
        bad.load_model(str(micro_run[1]["reward"]))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(srv.address, token=TOKEN) as c:
        assert c.load_model(str(micro_run[1]["reward"])).model_version == 2
        with pytest.raises(grpc.RpcError) as e:
            c.load_model("/nonexistent/ckpt")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            c.load_model(str(micro_run[1]["sft"]))  # no scalar head
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "scalar head" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.load_model(str(micro_run[1]["reward"]), version=1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_version" in e.value.details()
        # a Hugging Face directory that cannot load (config only, no weights): the request's fault, named
        broken = tmp_path / "hf-broken"
        broken.mkdir()
        (broken / "config.json").write_text('{"model_type": "gpt2"}')
        (broken / "scalar_head.safetensors").write_bytes(b"")
        with pytest.raises(grpc.RpcError) as e:
            c.load_model(str(broken))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert e.value.details().startswith("checkpoint_uri")
        assert c.model_info().model_version == 2


def test_metrics_count_rpcs_by_code(reward_server):
    srv, _ = reward_server
    with RewardClient(srv.address) as c:
        c.score(["p"], ["r"])
        with pytest.raises(grpc.RpcError):
            c._call(c.stub.Score, reward_pb2.ScoreRequest())
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
    assert 'chatrl_reward_rpc_requests_total{code="OK",method="Score"} 1.0' in body
    assert 'chatrl_reward_rpc_requests_total{code="INVALID_ARGUMENT",method="Score"} 1.0' in body
    assert "chatrl_reward_rpc_latency_seconds_bucket" in body
    assert "chatrl_reward_pairs_scored_total 1.0" in body and "chatrl_reward_model_version 1.0" in body


def test_health_not_serving_until_model_loaded(micro_run):
    srv, svc = build_reward(ServerConfig(port=0, auth_token_env=""), RewardConfig())
    try:
        with RewardClient(srv.address) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.score(["p"], ["r"])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            c.load_model(str(micro_run[1]["reward"]))
            assert c.health() == "SERVING"
    finally:
        srv.stop(0)
        svc.batcher.close()
    with RewardClient(srv.address, retries=1) as c:
        assert c.health() == "UNAVAILABLE"


def test_reference_logprobs_match_in_process(reference_server, micro_run):
    srv, _ = reference_server
    ck = load_checkpoint(micro_run[1]["sft"])
    model, tok = model_from_checkpoint(ck), tokenizer_from_checkpoint(ck)
    prompt = tok.prompt_ids("How was the film?")
    resp = tok.encode("The film was warm.") + [tok.end_id]
    seqs = [prompt + resp, prompt + resp[:3]]
    with ReferenceClient(srv.address) as c:
        lps, version = c.logprobs(seqs, [len(prompt), len(prompt)])
        lps = [torch.from_numpy(x) for x in lps]  # the client returns numpy (it needs no torch)
        assert version == 1 and lps[0].shape == (len(resp),) and lps[1].shape == (3,)
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([seqs[0]])).logits[0, :-1], -1)
        expected = full.gather(-1, torch.tensor(seqs[0][1:])[:, None]).squeeze(-1)[len(prompt) - 1:]
        assert torch.allclose(lps[0], expected, atol=1e-4)
        assert torch.allclose(lps[1], expected[:3], atol=1e-4)  # padding in the batch changes nothing
        lp_t, _ = c.logprobs([seqs[0]], [len(prompt)], temperature=2.0)
        assert not torch.allclose(torch.from_numpy(lp_t[0]), lps[0])


@pytest.mark.parametrize("seq,field", [
    (reference_pb2.LogProbsSequence(token_ids=[1, 2, 3], response_start=0), "sequences[0].response_start"),
    (reference_pb2.LogProbsSequence(token_ids=[1, 2, 3], response_start=4), "sequences[0].response_start"),
    (reference_pb2.LogProbsSequence(token_ids=[], response_start=1), "sequences[0].token_ids"),
    (reference_pb2.LogProbsSequence(token_ids=[1] * 500, response_start=1), "exceeds"),
])
def test_reference_validation(reference_server, seq, field):
    srv, _ = reference_server
    with ReferenceClient(srv.address) as c, pytest.raises(grpc.RpcError) as e:
        c._call(c.stub.LogProbs, reference_pb2.LogProbsRequest(sequences=[seq]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
