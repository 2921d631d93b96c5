"""What the README promises about serving, each through real servers on 127.0.0.1: the operator/labeler
token on every service's writes, reference-model LoadModel, LoadModel reaching every replica, client
retries on UNAVAILABLE (idempotent methods only), and draining in-flight calls on SIGTERM."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from kit import WAIT, Process, env_var, rpc_error, save_tiny_checkpoint, tiny_gpt, tiny_tokenizer, wait_for

from chatrl.clients.lib import (
    FeedbackClient,
    PolicyClient,
    ReferenceClient,
    ReplicaGroup,
    RewardClient,
    TrainerClient,
)
from chatrl.services.proto.chatrl.v1 import feedback_pb2, feedback_pb2_grpc
from chatrl.services.runtime.server import ServerConfig

TOKEN = "serving-test-token"
TOKEN_ENV = "CHATRL_SERVING_TEST_TOKEN"
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, checkpoint dir) of a tiny policy."""
    tok = tiny_tokenizer()
    model = tiny_gpt(tok.vocab_size, 0)
    return tok, model, save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), model, tok)


def _serve(service: str, micro_run, tiny, tmp_path, token: str = TOKEN):
    """A real server of ``service`` with ``token`` configured: (server, servicer)."""
    cfg = ServerConfig(port=0, auth_token_env=TOKEN_ENV, grace_seconds=1)
    with env_var(TOKEN_ENV, token):
        if service == "policy":
            from chatrl.services.policy.server import PolicyConfig, build
            return build(cfg, PolicyConfig(checkpoint=str(tiny[2]), max_new_tokens=8))
        if service == "reward":
            from chatrl.services.reward.server import RewardConfig, build
            return build(cfg, RewardConfig(checkpoint=str(micro_run[1]["reward"])))
        if service == "reference":
            from chatrl.services.reference.server import ReferenceConfig, build
            return build(cfg, ReferenceConfig(checkpoint=str(micro_run[1]["sft"])))
        if service == "feedback":
            from chatrl.services.feedback.server import FeedbackConfig, build
            return build(cfg, FeedbackConfig(db=str(tmp_path / "fb.db"), policy_address="127.0.0.1:1"))
        from chatrl.services.trainer.server import TrainerConfig, build
        return build(cfg, TrainerConfig(runs_dir=str(tmp_path / "runs"), threads=1))


def _close(srv, svc) -> None:
    srv.stop(0)
    if hasattr(svc, "close"):
        svc.close()
    elif hasattr(svc, "batcher"):
        svc.batcher.close()


# service → (client class, the write it guards, what the right token gets: a check on the result)
WRITES = {
    "policy": (PolicyClient, lambda c, t: c.update_weights(t[1].state_dict(), 2),
               lambda r: r.model_version == 2),
    "reward": (RewardClient, lambda c, t: c.load_model(c.model_info().checkpoint_uri, 2),
               lambda r: r.model_version == 2),
    "reference": (ReferenceClient, lambda c, t: c.load_model(c.model_info().checkpoint_uri, 2),
                  lambda r: r.model_version == 2),
    "feedback": (FeedbackClient, lambda c, t: c.add_prompts(["needs the token"]), lambda r: r.added == 1),
    "trainer": (TrainerClient, lambda c, t: c.cancel_run("no-such-run"), None),
}


@pytest.mark.parametrize("service", list(WRITES))
def test_every_service_refuses_a_write_without_the_right_token(service, micro_run, tiny, tmp_path):
    srv, svc = _serve(service, micro_run, tiny, tmp_path)
    client_cls, write, ok = WRITES[service]
    try:
        for token in ("", "wrong-token"):
            with client_cls(srv.address, token=token, retries=1, timeout=WAIT) as c:
                code, msg = rpc_error(write, c, tiny)
                assert code == CODE.UNAUTHENTICATED and "Bearer" in msg, (service, token, code, msg)
        with client_cls(srv.address, token=TOKEN, retries=1, timeout=WAIT) as c:
            if ok is None:  # the trainer: past the token check, the run is simply unknown
                code, msg = rpc_error(write, c, tiny)
                assert code == CODE.NOT_FOUND and "run_id" in msg, (code, msg)
            else:
                assert ok(write(c, tiny))
    finally:
        _close(srv, svc)


def _logprobs(client: ReferenceClient, seq: list[int]) -> list[float]:
    (lp,), _version = client.logprobs([seq], [2])
    return lp.tolist()


def test_reference_load_model_swaps_the_model_and_reaches_every_replica(micro_run, tiny, tmp_path):
    """LoadModel replaces the reference model (its LogProbs become the new checkpoint's, its version the
    given one), and through a ReplicaGroup it reaches every replica the name resolves to."""
    from chatrl.services.reference.server import ReferenceConfig, build

    a, b = _serve("reference", micro_run, tiny, tmp_path), _serve("reference", micro_run, tiny, tmp_path)
    # `pre` serves the pre-trained checkpoint from the start: what a and b must answer after the load
    pre = build(ServerConfig(port=0, auth_token_env=""), ReferenceConfig(checkpoint=str(micro_run[1]["pretrain"])))
    seq = [5, 6, 7, 8, 9]
    group = ReplicaGroup(ReferenceClient, "reference-pods:50051", resolve=lambda _: [a[0].address, b[0].address],
                         token=TOKEN, retries=1, timeout=WAIT)
    try:
        with ReferenceClient(pre[0].address, retries=1, timeout=WAIT) as c:
            want = _logprobs(c, seq)
        with ReferenceClient(a[0].address, retries=1, timeout=WAIT) as c:
            before = _logprobs(c, seq)
        assert before != pytest.approx(want, abs=1e-4)  # SFT and pre-trained weights differ
        out = group.load_model(str(micro_run[1]["pretrain"]), version=7)
        assert {addr: info.model_version for addr, info in out.items()} == {a[0].address: 7, b[0].address: 7}
        for srv, _ in (a, b):
            with ReferenceClient(srv.address, retries=1, timeout=WAIT) as c:
                assert c.model_info().model_version == 7
                assert _logprobs(c, seq) == pytest.approx(want, abs=1e-5)
        assert group.model_versions() == {a[0].address: 7, b[0].address: 7}
    finally:
        group.close()
        for s in (a, b, pre):
            _close(*s)


class _Flaky(feedback_pb2_grpc.FeedbackServiceServicer):
    """A feedback service that answers UNAVAILABLE to the first ``failures`` calls of each method (a
    restarting pod), counting every attempt that reaches it."""

    def __init__(self, failures: int) -> None:
        self.failures, self.attempts, self.lock = failures, {}, threading.Lock()

    def _attempt(self, method: str, context) -> None:
        with self.lock:
            n = self.attempts[method] = self.attempts.get(method, 0) + 1
        if n <= self.failures:
            context.abort(CODE.UNAVAILABLE, "restarting")

    def GetStats(self, request, context):
        self._attempt("GetStats", context)
        return feedback_pb2.GetStatsResponse(rankings=3)

    def AddPrompts(self, request, context):
        self._attempt("AddPrompts", context)
        return feedback_pb2.AddPromptsResponse(added=1)


def test_client_retries_unavailable_on_idempotent_calls_only():
    flaky = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(flaky, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with FeedbackClient(f"127.0.0.1:{port}", token="", retries=5, backoff_s=0.01, timeout=WAIT) as c:
            # a read: two UNAVAILABLE answers, then the third attempt succeeds — the caller sees only success
            assert c.stats().rankings == 3
            assert flaky.attempts["GetStats"] == 3
            # AddPrompts is not idempotent (a resend could add twice): one attempt, the error surfaces
            code, msg = rpc_error(c.add_prompts, ["p"])
            assert code == CODE.UNAVAILABLE and msg == "restarting"
            assert flaky.attempts["AddPrompts"] == 1
        with FeedbackClient(f"127.0.0.1:{port}", token="", retries=2, backoff_s=0.01, timeout=WAIT) as c:
            flaky.attempts.clear()
            code, _ = rpc_error(c.stats)  # two attempts allowed, both refused
            assert code == CODE.UNAVAILABLE and flaky.attempts["GetStats"] == 2
    finally:
        server.stop(None)


def test_sigterm_drains_the_call_in_flight_and_refuses_new_ones(tiny, tmp_path):
    """A feedback process gets SIGTERM while CreateComparisonTasks waits on policy-inference (whose engine
    the test holds paused): new calls are refused at once, the call in flight still completes with its
    tasks stored, and the process exits 0."""
    from chatrl.services.core.feedback_store import FeedbackStore
    from chatrl.services.policy.server import PolicyConfig
    from chatrl.services.policy.server import build as build_policy

    psrv, psvc = build_policy(ServerConfig(port=0, auth_token_env=""),
                              PolicyConfig(checkpoint=str(tiny[2]), max_new_tokens=8))
    db = tmp_path / "fb.db"
    try:
        with Process.module("chatrl.services.feedback", "--db", str(db), "--port", "0",
                            "--set", "host=127.0.0.1", "--set", f"policy_address={psrv.address}",
                            "--set", "grace_seconds=120",
                            log=tmp_path / "feedback.log", env={"CHATRL_AUTH_TOKEN": TOKEN}) as p:
            line = wait_for(lambda: next((ln for ln in p.output().splitlines() if "serving on" in ln), None)
                            or (not p.alive() and "exited: " + p.output()), what="the serving line")
            addr = line.split("serving on ")[1].split()[0]
            with FeedbackClient(addr, token=TOKEN, retries=1, timeout=WAIT) as c:
                c.wait_serving(WAIT)
                psvc.engine.pause()  # the policy will hold the sampling request until resumed
                call = c.stub.CreateComparisonTasks.future(feedback_pb2.CreateComparisonTasksRequest(
                    prompts=["How was the film?"], k=2), metadata=c._md, timeout=WAIT)
                wait_for(lambda: psvc.engine.stats.queue_depth == 1, what="the call to reach policy-inference")
                p.signal()  # SIGTERM

                def refused() -> bool:
                    try:
                        c.stub.GetStats(feedback_pb2.GetStatsRequest(), timeout=5)
                        return False
                    except grpc.RpcError as e:
                        return e.code() == CODE.UNAVAILABLE

                wait_for(refused, what="new calls to be refused")
                assert not call.done() and p.alive()  # draining: the call in flight is still waited for
                psvc.engine.resume()
                resp = call.result(WAIT)
                assert len(resp.task_ids) == 1
            assert p.wait() == 0, p.output()
    finally:
        psvc.engine.resume()
        psrv.stop(0)
        psvc.close()
    with FeedbackStore(db) as s:
        assert s.stats()["tasks"] == 1  # the drained call's task was stored before the process exited
