"""LoadModel does not trust checkpoints, and reference log-probs are bounded and never silently NaN (issue 11
items 9, 10): every bad checkpoint answers INVALID_ARGUMENT naming the field while the previous model keeps
serving; the reference model batches by a token budget and never builds a full fp32 softmax."""

from __future__ import annotations

import grpc
import pytest
import torch
from kit import rpc_error, save_tiny_checkpoint, tiny_gpt, tiny_tokenizer

from chatrl.services.core.checkpoint import load_checkpoint, save_checkpoint
from chatrl.services.core.generate import head_logprobs, token_logprobs
from chatrl.services.proto.chatrl.v1 import reference_pb2, reference_pb2_grpc
from chatrl.services.reference.server import ReferenceConfig, build
from chatrl.services.runtime.server import ServerConfig

CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def served(tmp_path, tok):
    good = save_tiny_checkpoint(tmp_path / "good", tiny_gpt(tok.vocab_size, 0), tok)
    srv, svc = build(ServerConfig(port=0, auth_token_env="", labeler_token_env="", grace_seconds=0),
                     ReferenceConfig(checkpoint=str(good), max_batch_tokens=24))
    ch = grpc.insecure_channel(srv.address)
    yield reference_pb2_grpc.ReferenceModelServiceStub(ch), srv, tmp_path
    ch.close()
    srv.stop(0)
    svc.close()


def _load(stub, uri: str, sha256: str = ""):
    return rpc_error(stub.LoadModel, reference_pb2.ReferenceModelServiceLoadModelRequest(
        checkpoint_uri=uri, sha256=sha256), timeout=60)


def _still_serving_version_1(stub):
    info = stub.GetModelInfo(reference_pb2.ReferenceModelServiceGetModelInfoRequest(), timeout=60).info
    assert info.model_version == 1 and info.loaded
    req = reference_pb2.LogProbsRequest(sequences=[reference_pb2.LogProbsSequence(token_ids=[5, 6, 7],
                                                                                  response_start=1)])
    assert stub.LogProbs(req, timeout=60).model_version == 1


def test_an_over_long_or_invalid_uri_is_invalid_and_not_echoed_whole(served):
    stub, _, _ = served
    code, msg = _load(stub, "/tmp/" + "x" * 200_000)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("checkpoint_uri") and len(msg) < 600
    code, msg = _load(stub, "/tmp/a\x00b")
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("checkpoint_uri")
    _still_serving_version_1(stub)


def test_non_finite_weights_are_refused(served, tok):
    stub, _, tmp = served
    model = tiny_gpt(tok.vocab_size, 1)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    bad = save_tiny_checkpoint(tmp / "nan", model, tok)
    code, msg = _load(stub, str(bad))
    assert code == CODE.INVALID_ARGUMENT and "non-finite" in msg
    _still_serving_version_1(stub)


def test_a_shape_mismatch_is_invalid(served, tok):
    stub, _, tmp = served
    small, big = tiny_gpt(tok.vocab_size, 1, d_model=16), tiny_gpt(tok.vocab_size, 1, d_model=32)
    save_checkpoint(tmp / "mismatch", "final", stage="sft", step=1, model_state=small.state_dict(),
                    model_config=big.cfg.to_dict(), tokenizer_json=tok.to_str(), save_rng=False)
    code, msg = _load(stub, str(tmp / "mismatch"))
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("checkpoint_uri") and "shape" in msg
    _still_serving_version_1(stub)


def test_the_sha256_the_caller_knows_is_checked(served, tok):
    stub, _, tmp = served
    other = save_tiny_checkpoint(tmp / "other", tiny_gpt(tok.vocab_size, 2), tok)
    code, msg = _load(stub, str(other), sha256="0" * 64)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("sha256")
    _still_serving_version_1(stub)
    info = stub.LoadModel(reference_pb2.ReferenceModelServiceLoadModelRequest(
        checkpoint_uri=str(other), sha256=load_checkpoint(other).sha256), timeout=60).info
    assert info.model_version == 2


def test_non_finite_log_probs_are_an_error_not_an_answer(served):
    stub, _, _ = served
    # a temperature this small overflows the scaled logits: inf - inf = NaN without the check
    req = reference_pb2.LogProbsRequest(temperature=1e-45, sequences=[
        reference_pb2.LogProbsSequence(token_ids=[5, 6, 7, 8], response_start=1)])
    code, msg = rpc_error(stub.LogProbs, req, timeout=60)
    assert code == CODE.FAILED_PRECONDITION and "sequences[0]" in msg and "non-finite" in msg


def test_log_probs_are_gathered_in_chunks_and_batches_follow_the_token_budget(served):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)  # [B, T, V]
    targets = torch.randint(0, 11, (3, 5))
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logprobs(logits, targets, 0.7, max_elems=2 * 11)  # two positions of one row per chunk
    assert torch.allclose(got, want, atol=1e-6)
    head, hidden = torch.nn.Linear(4, 11, bias=False), torch.randn(7, 4)  # the LM head on 7 positions, 3 a slice
    want = torch.log_softmax(head(hidden) / 0.7, -1).gather(-1, targets.reshape(-1)[:7, None]).squeeze(-1)
    got = head_logprobs(head, hidden, targets.reshape(-1)[:7], 0.7, max_elems=3 * 11)
    assert torch.allclose(got, want, atol=1e-6)
    stub, srv, _ = served
    # 6 sequences of 10 tokens against a budget of 24 tokens: at most 2 per forward pass
    req = reference_pb2.LogProbsRequest(sequences=[reference_pb2.LogProbsSequence(
        token_ids=list(range(5, 15)), response_start=4) for _ in range(6)])
    res = stub.LogProbs(req, timeout=60)
    assert len(res.logprobs) == 6
    passes = srv.registry.get_sample_value("chatrl_reference_batch_size_count")
    assert passes >= 3 and srv.registry.get_sample_value("chatrl_reference_batch_size_bucket", {"le": "2.0"}) == passes
