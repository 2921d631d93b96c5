"""Shared runtime pieces: TLS and mutual TLS, JSON logs, the micro-batcher's backpressure, codecs."""

from __future__ import annotations

import json
import logging
import subprocess
import threading

import grpc
import pytest
import torch
from kit import env_var, rpc_error

from chatrl.clients.lib import ClientOptions, RewardClient
from chatrl.services.proto.codecs import TensorDecodeError, tensor_from_proto, tensor_to_proto
from chatrl.services.reward.server import RewardConfig
from chatrl.services.reward.server import build as build_reward
from chatrl.services.runtime.batcher import MicroBatcher
from chatrl.services.runtime.errors import ServiceError
from chatrl.services.runtime.logs import JsonFormatter
from chatrl.services.runtime.server import ServerConfig


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


def _scores_handled(srv) -> float:
    """Score calls that reached the service's handler, whatever their status."""
    return sum(s.value for m in srv.registry.collect() if m.name == "chatrl_reward_rpc_requests"
               for s in m.samples if s.name.endswith("_total") and s.labels.get("method") == "Score")


def test_tls_and_mutual_tls(pki, micro_run):
    ck = str(micro_run[1]["reward"])
    tls = ServerConfig(port=0, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    srv, svc = build_reward(tls, RewardConfig(checkpoint=ck))
    try:
        with RewardClient(srv.address, ClientOptions(tls_ca=str(pki / "ca.pem"))) as c:
            assert len(c.score(["p"], ["r"]).rewards) == 1
        with RewardClient(srv.address, ClientOptions(retries=1, timeout=5)) as plain:  # plaintext to a TLS port
            code, msg = rpc_error(plain.score, ["p"], ["r"])
            # the TLS handshake fails (the server reads a plaintext HTTP/2 preface), so the server closes
            # the socket: no call ever reaches the service
            assert code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in msg, (code, msg)
            assert _scores_handled(srv) == 1  # only the TLS client's
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
            code, msg = rpc_error(anon.score, ["p"], ["r"])
            # no client certificate: the server ends the handshake (PEER_DID_NOT_RETURN_A_CERTIFICATE)
            assert code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in msg, (code, msg)
            assert _scores_handled(srv) == 1  # only the client with a certificate
    finally:
        srv.stop(0)
        svc.batcher.close()


def test_max_connection_age_makes_clients_reconnect(micro_run):
    """With max_connection_age_s the server ends each connection after that age (clients re-resolve the
    name and reach replicas that joined since); calls carry on over the new connection."""
    srv, svc = build_reward(ServerConfig(port=0, max_connection_age_s=0.3), RewardConfig(checkpoint=str(micro_run[1]["reward"])))
    states: list = []
    aged = threading.Event()  # set when the channel connects again after having been READY

    def watch(state) -> None:
        if state == grpc.ChannelConnectivity.CONNECTING and grpc.ChannelConnectivity.READY in states:
            aged.set()
        states.append(state)

    try:
        with RewardClient(srv.address, ClientOptions(retries=3, timeout=5)) as c:
            c.channel.subscribe(watch, try_to_connect=False)
            assert len(c.score(["p"], ["r"]).rewards) == 1
            assert aged.wait(10), f"the connection was never aged out: {states}"
            assert len(c.score(["p"], ["r"]).rewards) == 1  # a new connection
    finally:
        srv.stop(0)
        svc.batcher.close()


def test_json_log_lines():
    rec = logging.LogRecord("chatrl.x", logging.INFO, __file__, 1, "scored %d", (3,), None)
    rec.fields = {"model_version": 2}
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "scored 3" and line["model_version"] == 2 and line["level"] == "info"


def test_batcher_backpressure_and_error_isolation():
    gate, entered = threading.Event(), threading.Event()

    def fn(items):
        entered.set()
        gate.wait(60)
        if "boom" in items:
            raise ValueError("bad batch")
        return [i * 2 for i in items]

    b = MicroBatcher(fn, max_batch=4, max_wait_s=0.0, max_queue=2)
    try:
        t = threading.Thread(target=lambda: b.submit([1]))  # occupies the worker
        t.start()
        assert entered.wait(10)  # the worker holds [1]
        results = []
        t2 = threading.Thread(target=lambda: results.append(b.submit([2, 3])))  # fills the queue
        t2.start()
        with b.q.not_empty:  # notified on every put
            assert b.q.not_empty.wait_for(lambda: len(b.q.queue) >= 2, timeout=10), f"queue depth {b.depth()}"
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
        assert torch.equal(tensor_from_proto(tensor_to_proto(t), as_torch=True), t)
    msg = tensor_to_proto(torch.randn(2, 3))
    msg.shape[:] = [4, 3]
    with pytest.raises(TensorDecodeError, match="data"):
        tensor_from_proto(msg, "logprobs")
    msg.dtype = 0
    with pytest.raises(TensorDecodeError, match="dtype"):
        tensor_from_proto(msg)


# --- weights on the wire (services/proto/codecs.py) -------------------------------------------------

def _weights_state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "ids": torch.arange(5, dtype=torch.int64),
            "h": torch.randn(3, generator=g).to(torch.bfloat16), "flag": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 2), "b": torch.tensor([7], dtype=torch.uint8)}


def test_packed_weights_are_safetensors_both_ways_and_reuse_the_buffer():
    from safetensors.torch import load, save

    from chatrl.services.proto.codecs import pack_state, unpack_state

    sd = _weights_state()
    buf = pack_state(sd, metadata={"stage": "ppo"})
    back = load(bytes(buf))  # the safetensors library reads what we write
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    theirs = unpack_state(bytearray(save(sd)))  # and we read what it writes
    assert all(torch.equal(theirs[k], sd[k]) and theirs[k].dtype == sd[k].dtype for k in sd)
    views = unpack_state(buf)
    assert all(torch.equal(views[k], sd[k]) for k in sd)
    sd2 = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    again = pack_state(sd2, buf, metadata={"stage": "ppo"})
    assert again is buf  # same size: written in place
    assert torch.equal(views["w"], sd["w"] + 1)  # views alias the buffer (the receiver copies them out)
    assert pack_state({"x": torch.zeros(2)}, buf) is not buf  # another size: a new buffer


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b[:4], "shorter than the 8-byte"),
    (lambda b: (10 ** 9).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:8] + b"{" * (int.from_bytes(b[:8], "little")) + b[8 + int.from_bytes(b[:8], "little"):],
     "not JSON"),
    (lambda b: b[:-1], "data_offsets"),
    (lambda b: b + b"\0" * 8, "cover"),
])
def test_malformed_weight_payloads_name_the_problem(mutate, match):
    from chatrl.services.proto.codecs import WeightsFormatError, pack_state, unpack_state

    buf = bytes(pack_state({"w": torch.ones(2, 2), "v": torch.ones(3)}))
    with pytest.raises(WeightsFormatError, match=match):
        unpack_state(bytearray(mutate(buf)))


def test_weight_payload_with_overlapping_tensors_is_refused():
    import json
    import struct

    from chatrl.services.proto.codecs import WeightsFormatError, unpack_state

    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    payload = bytearray(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(WeightsFormatError, match="overlap"):
        unpack_state(payload)


TRIM_SCRIPT = r"""
import ctypes, json, psutil
from chatrl.services.runtime.memory import release_free_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)  # glibc raises its mmap threshold
blocks = [libc.malloc(1 << 20) for _ in range(400)]  # 400 MB of 1-MB blocks, now from the heap
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
for b in blocks[:-1]:  # all but the last: the heap's top stays in use, so glibc's own trimming cannot shrink it
    libc.free(b)
before = rss()
ok = release_free_memory()
print(json.dumps({"ok": ok, "before": before, "after": rss()}))
"""


def test_freed_heap_memory_goes_back_to_the_os():
    """What the trimmer each chatrl process runs does: 400 MB freed to glibc's heap stay resident until
    malloc_trim hands them back."""
    import sys

    if sys.platform != "linux":
        pytest.skip("malloc_trim is glibc's")
    r = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["ok"] and got["before"] - got["after"] > 300 << 20, got


def test_the_trim_interval_comes_from_the_environment():
    from chatrl.services.runtime.memory import DEFAULT_TRIM_SECONDS, TRIM_SECONDS_ENV, trim_interval

    with env_var(TRIM_SECONDS_ENV, ""):
        assert trim_interval() == DEFAULT_TRIM_SECONDS
    with env_var(TRIM_SECONDS_ENV, "0"):
        assert trim_interval() == 0
    for bad in ("often", "-1"):
        with env_var(TRIM_SECONDS_ENV, bad), pytest.raises(ValueError, match=TRIM_SECONDS_ENV):
            trim_interval()
