"""Every request is bounded before it is expensive, and health and control calls never queue behind the data
plane (issue 11 items 4 and 5), through the real policy-inference server on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kit import WAIT, rpc_error, tiny_checkpoint, wait_for

from chatrl.services.policy.server import PolicyConfig, build
from chatrl.services.proto.chatrl.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from chatrl.services.runtime import roles
from chatrl.services.runtime.errors import ServiceError, check_token_ids
from chatrl.services.runtime.server import ServerConfig

CODE = grpc.StatusCode


@pytest.fixture()
def policy(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    # max_batch_size 1: data-plane calls are capped at max(max_concurrent_rpcs, batch + 16) = 17
    srv, svc = build(ServerConfig(port=0, auth_token_env="", labeler_token_env="", grace_seconds=0,
                                  max_concurrent_rpcs=1, max_streams=2),
                     PolicyConfig(checkpoint=str(ckpt), max_new_tokens=4, max_batch_size=1))
    ch = grpc.insecure_channel(srv.address)
    yield srv, svc, ch
    svc.engine.resume()
    ch.close()
    srv.stop(0)
    svc.close()


def _gen(text: str = "hello there") -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text=text)],
                                      sampling=common_pb2.SamplingParams(max_new_tokens=2, seed=1))


def test_an_oversized_request_is_refused_naming_the_method_and_its_limit(policy):
    srv, _, ch = policy
    stub = policy_pb2_grpc.PolicyInferenceServiceStub(ch)
    limit = roles.rule("/chatrl.v1.PolicyInferenceService/Generate").max_request_bytes
    code, msg = rpc_error(stub.Generate, _gen("x" * (limit + 1)), timeout=WAIT)
    assert code == CODE.RESOURCE_EXHAUSTED and "Generate" in msg and str(limit) in msg
    # a small read takes at most 4 KiB
    req = policy_pb2.PolicyInferenceServiceGetModelInfoRequest()
    req.ParseFromString(b"\x0a" + bytes([0x80, 0x40]) + b"y" * 8192)  # unknown field 1 of 8 KiB
    code, msg = rpc_error(stub.GetModelInfo, req, timeout=WAIT)
    assert code == CODE.RESOURCE_EXHAUSTED and "GetModelInfo" in msg


class _Huge:
    """200M token ids that must never be iterated: their count alone refuses them."""

    def __len__(self) -> int:
        return 200_000_000

    def __iter__(self):
        raise AssertionError("the ids were iterated before their count was checked")


def test_token_ids_are_counted_before_they_are_copied():
    with pytest.raises(ServiceError) as e:
        check_token_ids(_Huge(), 300, "sequences[0].token_ids", max_len=128)
    assert e.value.code == CODE.INVALID_ARGUMENT
    assert e.value.message == "sequences[0].token_ids: 200000000 ids exceed the limit of 128"
    with pytest.raises(ServiceError) as e:  # out-of-range ids are still named by index
        check_token_ids([5, 300, 7], 300, "ids", max_len=128)
    assert e.value.message == "ids[1]: token id 300 out of range [0, 300)"


def test_health_and_control_answer_while_the_data_plane_is_full(policy):
    srv, svc, ch = policy
    stub = policy_pb2_grpc.PolicyInferenceServiceStub(ch)
    health = health_pb2_grpc.HealthStub(ch)
    svc.engine.pause()  # every Generate waits in the engine, holding its handler thread
    cap = srv.cfg.max_concurrent_rpcs
    assert cap == 17
    held = [stub.Generate.future(_gen(), timeout=WAIT * 2) for _ in range(cap)]
    wait_for(lambda: svc.engine.stats.queue_depth == cap, what="the data plane to fill")
    code, msg = rpc_error(stub.Generate, _gen(), timeout=WAIT)
    assert code == CODE.RESOURCE_EXHAUSTED and "data-plane" in msg
    def stream():
        return stub.GenerateStream(policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(text="hi"), sampling=common_pb2.SamplingParams(max_new_tokens=2)),
            timeout=WAIT * 2)

    streams = [stream() for _ in range(srv.cfg.max_streams)]  # they wait on the paused engine
    wait_for(lambda: svc.engine.stats.queue_depth == cap + len(streams), what="the streams to open")
    code, msg = rpc_error(lambda: next(stream()))
    assert code == CODE.RESOURCE_EXHAUSTED and "streams" in msg
    # health and the operator's UpdateWeights still answer (the bad upload reached its handler)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT).status == \
        health_pb2.HealthCheckResponse.SERVING
    bad = policy_pb2.UpdateWeightsRequest(chunk=policy_pb2.WeightsChunk(version=9, total_bytes=3,
                                                                        sha256="0" * 64, data=b"abc"))
    code, msg = rpc_error(stub.UpdateWeights, iter([bad]), timeout=WAIT)
    assert code == CODE.INVALID_ARGUMENT and "sha256" in msg
    svc.engine.resume()
    assert all(f.result(WAIT * 2).results for f in held)
    for s in streams:
        s.cancel()
