"""Shared runtime pieces: TLS and mutual TLS, JSON logs, the micro-batcher's backpressure, codecs."""

from __future__ import annotations

import json
import logging
import subprocess
import threading

import grpc
import pytest
import torch

from clients.lib import ClientOptions, RewardClient
from services.reward.server import RewardConfig
from services.reward.server import build as build_reward
from services.runtime.batcher import MicroBatcher
from services.runtime.errors import ServiceError
from services.runtime.logs import JsonFormatter
from services.runtime.server import ServerConfig
from services.runtime.tensors import TensorDecodeError, from_proto, to_proto


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=chatrl-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                "-subj", f"/CN={who}", cwd=d)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_tls_and_mutual_tls(pki, micro_run):
    ck = str(micro_run[1]["reward"])
    tls = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    srv, svc = build_reward(tls, RewardConfig(checkpoint=ck))
    try:
        with RewardClient(srv.address, ClientOptions(tls_ca=str(pki / "ca.pem"))) as c:
            assert len(c.score(["p"], ["r"]).rewards) == 1
        with RewardClient(srv.address, ClientOptions(retries=1, timeout=5)) as plain:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError):
                plain.score(["p"], ["r"])
    finally:
        srv.stop(0)
        svc.batcher.close()
    mtls = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                        tls_client_ca=str(pki / "ca.pem"))
    srv, svc = build_reward(mtls, RewardConfig(checkpoint=ck))
    try:
        ok = ClientOptions(tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
        with RewardClient(srv.address, ok) as c:
            assert len(c.score(["p"], ["r"]).rewards) == 1
        with RewardClient(srv.address, ClientOptions(tls_ca=str(pki / "ca.pem"), retries=1, timeout=5)) as anon:
            with pytest.raises(grpc.RpcError):  # no client certificate: the handshake is refused
                anon.score(["p"], ["r"])
    finally:
        srv.stop(0)
        svc.batcher.close()


def test_json_log_lines():
    rec = logging.LogRecord("chatrl.x", logging.INFO, __file__, 1, "scored %d", (3,), None)
    rec.fields = {"model_version": 2}
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "scored 3" and line["model_version"] == 2 and line["level"] == "info"


def test_batcher_backpressure_and_error_isolation():
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        if "boom" in items:
            raise ValueError("bad batch")
        return [i * 2 for i in items]

    b = MicroBatcher(fn, max_batch=4, max_wait_s=0.0, max_queue=2)
    try:
        t = threading.Thread(target=lambda: b.submit([1]))  # occupies the worker
        t.start()
        while b.batches == 0 and b.depth() > 0:
            pass
        results = []
        t2 = threading.Thread(target=lambda: results.append(b.submit([2, 3])))  # fills the queue
        t2.start()
        while b.depth() < 2:
            pass
        with pytest.raises(ServiceError) as e:
            b.submit([4])
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        t.join()
        t2.join()
        assert results == [[4, 6]]
        with pytest.raises(ValueError, match="bad batch"):
            b.submit(["boom"])
        assert b.submit([5]) == [10]  # the worker survived the failing batch
    finally:
        gate.set()
        b.close()


def test_tensor_codec_roundtrip_and_errors():
    for t in [torch.randn(2, 3), torch.randn(4).bfloat16(), torch.arange(5), torch.tensor([True, False]),
              torch.randn(3).half(), torch.zeros(0, 4)]:
        assert torch.equal(from_proto(to_proto(t)), t)
    msg = to_proto(torch.randn(2, 3))
    msg.shape[:] = [4, 3]
    with pytest.raises(TensorDecodeError, match="data"):
        from_proto(msg, "logprobs")
    msg.dtype = 0
    with pytest.raises(TensorDecodeError, match="dtype"):
        from_proto(msg)
