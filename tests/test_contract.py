"""The contract helpers: enum ⇄ string maps checked against the enum descriptors, the one table of
domain-error statuses, the numpy wire codecs, and the channel's retry policy against a real server."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from chatrl.clients.lib import FeedbackClient, TrainerClient
from chatrl.services.proto.chatrl.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from chatrl.services.proto.codecs import (
    TensorDecodeError,
    pack_state,
    tensor_from_proto,
    tensor_to_proto,
    unpack_state,
)
from chatrl.services.proto.enums import (
    ALL,
    DTYPE,
    EXPORT_KIND,
    FINISH_REASON,
    ROLE,
    RUN_STATE,
    STAGE,
    UnknownEnumError,
)
from chatrl.services.runtime.errors import STATUS, domain_error, http_status

ENUMS = {m.label: m for m in ALL}


def test_every_proto_enum_has_a_map():
    declared = {e.name for f in (common_pb2, feedback_pb2, trainer_pb2) for e in f.DESCRIPTOR.enum_types_by_name.values()}
    assert declared == set(ENUMS)


@pytest.mark.parametrize("label", sorted(ENUMS))
def test_every_value_round_trips(label):
    m = ENUMS[label]
    for v in m.descriptor.values:
        assert m.value(m.name(v.number)) == v.number
    assert len(m.names) == len(m.descriptor.values) - 1  # every value but *_UNSPECIFIED has a string


@pytest.mark.parametrize("label", sorted(ENUMS))
def test_unknown_names_and_numbers_raise_naming_the_choices(label):
    m = ENUMS[label]
    with pytest.raises(UnknownEnumError, match=f"unknown {label} 'no-such-thing'.*{m.names[0]}"):
        m.value("no-such-thing")
    with pytest.raises(UnknownEnumError, match="value 99"):
        m.name(99)


def test_the_strings_the_rest_of_the_system_uses():
    assert [STAGE.value(s) for s in ("pretrain", "sft", "reward", "ppo", "pipeline")] == [
        trainer_pb2.STAGE_PRETRAIN, trainer_pb2.STAGE_SFT, trainer_pb2.STAGE_REWARD_MODEL, trainer_pb2.STAGE_PPO,
        trainer_pb2.STAGE_PIPELINE]
    assert STAGE.value("reward_model") == STAGE.value("REWARD") == trainer_pb2.STAGE_REWARD_MODEL
    assert RUN_STATE.name(trainer_pb2.RUN_STATE_SUCCEEDED) == "SUCCEEDED"  # as the trainer's run.json says
    assert FINISH_REASON.name(common_pb2.FINISH_REASON_STOP) == "stop"
    assert ROLE.value("assistant") == common_pb2.ROLE_ASSISTANT
    assert DTYPE.name(common_pb2.DTYPE_BFLOAT16) == "bfloat16"
    assert EXPORT_KIND.value("rankings") == feedback_pb2.EXPORT_KIND_RANKINGS
    assert STAGE.value("") == trainer_pb2.STAGE_UNSPECIFIED


def test_one_status_table_for_grpc_and_http():
    assert domain_error("invalid", "k: must be >= 2").code == grpc.StatusCode.INVALID_ARGUMENT
    assert domain_error("conflict", "x").code == grpc.StatusCode.ALREADY_EXISTS
    assert (http_status("invalid"), http_status("not_found"), http_status("conflict"),
            http_status("unauthenticated")) == (400, 404, 409, 401)
    assert domain_error("no-such-kind", "x").code == grpc.StatusCode.INTERNAL and http_status("no-such-kind") == 500
    assert all(isinstance(code, grpc.StatusCode) and 400 <= http < 600 for code, http in STATUS.values())


# --- codecs --------------------------------------------------------------------------------------------------

def test_tensor_codec_on_numpy_is_little_endian_bytes():
    msg = tensor_to_proto(np.array([[1, 2], [3, 4]], dtype=np.int32))
    assert msg.dtype == common_pb2.DTYPE_INT32 and list(msg.shape) == [2, 2]
    assert msg.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])
    np.testing.assert_array_equal(tensor_from_proto(msg), [[1, 2], [3, 4]])


def test_bfloat16_decodes_to_float32_for_numpy_users():
    # 1.5 in bfloat16 is 0x3FC0 (the top half of float32 0x3FC00000); little-endian on the wire
    msg = common_pb2.Tensor(data=bytes([0xC0, 0x3F]), dtype=common_pb2.DTYPE_BFLOAT16, shape=[1])
    out = tensor_from_proto(msg)
    assert out.dtype == np.float32 and out.tolist() == [1.5]


def test_tensor_decode_errors_name_the_field():
    bad = common_pb2.Tensor(data=b"\x00" * 3, dtype=common_pb2.DTYPE_FLOAT32, shape=[1])
    with pytest.raises(TensorDecodeError, match="logprobs\\[0\\].data: 3 bytes, expected 4"):
        tensor_from_proto(bad, "logprobs[0]")


def test_weights_codec_packs_numpy_and_reads_it_back():
    state = {"b": np.arange(3, dtype=np.int64), "a": np.ones((2, 2), dtype=np.float32)}
    buf = pack_state(state)
    back = unpack_state(buf, as_torch=False)
    np.testing.assert_array_equal(back["a"], state["a"])
    np.testing.assert_array_equal(back["b"], state["b"])
    assert pack_state(state, buf) is buf  # same shapes: the buffer is reused


# --- retries: gRPC's retry policy, idempotent methods only -----------------------------------------------

class _Flaky(feedback_pb2_grpc.FeedbackServiceServicer, trainer_pb2_grpc.TrainerServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of each method, then succeeds; counts calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.lock = failures, {}, threading.Lock()
        self.request_ids: list[str] = []

    def _attempt(self, name: str, context) -> None:
        with self.lock:
            n = self.calls[name] = self.calls.get(name, 0) + 1
        if n <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def GetStats(self, request, context):
        self._attempt("GetStats", context)
        return feedback_pb2.GetStatsResponse(rankings=7)

    def CreateComparisonTasks(self, request, context):
        self.request_ids.append(request.request_id)
        self._attempt("CreateComparisonTasks", context)
        return feedback_pb2.CreateComparisonTasksResponse(task_ids=["t"])

    def AddPrompts(self, request, context):
        self._attempt("AddPrompts", context)
        return feedback_pb2.AddPromptsResponse()

    def StartRun(self, request, context):
        self._attempt("StartRun", context)
        return trainer_pb2.StartRunResponse(run=trainer_pb2.Run(run_id="r", stage=request.stage))


@pytest.fixture
def flaky():
    svc = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(svc, server)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield svc, f"127.0.0.1:{port}"
    server.stop(None)


def test_an_idempotent_call_succeeds_across_unavailable(flaky):
    svc, addr = flaky
    with FeedbackClient(addr, retries=3, backoff_s=0.01, timeout=30) as c:
        assert c.stats().rankings == 7
    assert svc.calls["GetStats"] == 3  # two UNAVAILABLE answers, then the one that worked


def test_a_non_idempotent_call_is_not_retried(flaky):
    svc, addr = flaky
    with FeedbackClient(addr, retries=5, backoff_s=0.01, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.add_prompts(["p"])  # not idempotent: a second attempt would store the prompts twice
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and svc.calls["AddPrompts"] == 1


def test_a_call_keyed_by_request_id_is_retried_with_the_same_id(flaky):
    svc, addr = flaky
    with FeedbackClient(addr, retries=5, backoff_s=0.01, timeout=30) as c:
        assert list(c.create_comparison_tasks(["p"], k=2).task_ids) == ["t"]
    assert svc.calls["CreateComparisonTasks"] == 3
    assert len(set(svc.request_ids)) == 1 and svc.request_ids[0]  # one id, filled in by the client


def test_retries_stop_at_the_configured_attempts(flaky):
    svc, addr = flaky
    with FeedbackClient(addr, retries=2, backoff_s=0.01, timeout=30) as c, pytest.raises(grpc.RpcError):
        c.stats()
    assert svc.calls["GetStats"] == 2


@pytest.mark.parametrize("stage,expected", [("pretrain", trainer_pb2.STAGE_PRETRAIN), ("sft", trainer_pb2.STAGE_SFT),
                                            ("reward", trainer_pb2.STAGE_REWARD_MODEL), ("ppo", trainer_pb2.STAGE_PPO),
                                            ("pipeline", trainer_pb2.STAGE_PIPELINE)])
def test_start_run_accepts_every_stage_the_cli_documents(stage, expected):
    svc = _Flaky(failures=0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TrainerClient(f"127.0.0.1:{port}", timeout=30) as c:
            assert c.start_run(stage).stage == expected
    finally:
        server.stop(None)


def test_start_run_refuses_an_unknown_stage_before_calling():
    with TrainerClient("127.0.0.1:1") as c, pytest.raises(UnknownEnumError, match="pretrain, sft, reward, ppo, pipeline"):
        c.start_run("rlhf")
