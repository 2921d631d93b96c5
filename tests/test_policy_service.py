"""policy-inference through real gRPC on 127.0.0.1: every RPC, validation errors with their status codes,
auth, streaming, dynamic batching, UpdateWeights (chunks, sha256, atomic swap with requests in flight),
health, metrics, and ``python -m chatrl.services.policy``."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from kit import (
    WAIT,
    Process,
    env_var,
    free_port,
    rpc_error,
    save_tiny_checkpoint,
    tiny_gpt,
    tiny_tokenizer,
    wait_for,
)

from chatrl.clients.lib import PolicyClient, sampling_params, serialize_weights
from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.generate import SamplingParams, generate
from chatrl.services.policy.server import PolicyConfig, build
from chatrl.services.proto.chatrl.v1 import common_pb2, policy_pb2
from chatrl.services.proto.codecs import tensor_from_proto
from chatrl.services.runtime.server import ServerConfig

TOKEN = "policy-test-token"
TOKEN_ENV = "CHATRL_POLICY_TEST_TOKEN"
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("policy-ckpt"), tiny_gpt(tok.vocab_size, 0), tok)


@pytest.fixture(scope="module")
def model0(tok):
    return tiny_gpt(tok.vocab_size, 0)


@pytest.fixture(scope="module")
def model1(tok):
    return tiny_gpt(tok.vocab_size, 1)


class Server:
    def __init__(self, srv, svc) -> None:
        self.srv, self.svc, self.engine = srv, svc, svc.engine
        self.address = srv.address
        self.client = PolicyClient(self.address, token=TOKEN, retries=1, timeout=WAIT)
        self.anon = PolicyClient(self.address, token="", retries=1, timeout=WAIT)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.srv.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        self.client.close()
        self.anon.close()
        self.srv.stop(0)
        self.svc.close()


@pytest.fixture()
def make_server():
    made = []

    def make(**kw) -> Server:
        with env_var(TOKEN_ENV, TOKEN):
            srv, svc = build(ServerConfig(port=0, metrics_port=0, auth_token_env=TOKEN_ENV, grace_seconds=1,
                                          max_workers=32), PolicyConfig(**{"max_new_tokens": 32, **kw}))
        made.append(Server(srv, svc))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture()
def server(make_server, ckpt):
    """A fresh server per test: tests pause its engine, change its queue bound and read its counters."""
    return make_server(checkpoint=str(ckpt))


def reference(model, tok, prompt, max_new: int, seed: int | None, n: int = 1, **kw):
    out = []
    for j in range(n):
        sp = SamplingParams(max_new_tokens=max_new, seed=None if seed is None else seed + j,
                            stop_token_ids=(tok.end_id, tok.eot_id), **kw)
        out.append(generate(model, [prompt], sp, pad_id=tok.pad_id)[0])
    return out


def check_completions(comps, refs, tok):
    assert len(comps) == len(refs)
    for c, r in zip(comps, refs):
        assert list(c.token_ids) == r.tokens
        assert tensor_from_proto(c.logprobs).tolist() == pytest.approx(r.logprobs, abs=1e-4)
        assert c.finish_reason == (common_pb2.FINISH_REASON_STOP if r.finish_reason == "stop"
                                   else common_pb2.FINISH_REASON_LENGTH)
        assert c.text == tok.decode(r.tokens)


# --- tests ------------------------------------------------------------------------------------------

def test_health_reflection_and_model_info(server, ckpt, tok):
    assert server.client.health() == "SERVING"
    assert server.client.health("chatrl.v1.PolicyInferenceService") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "chatrl.v1.PolicyInferenceService" in {s.name for s in resp.list_services_response.service}
    info = server.client.model_info()
    ck = load_checkpoint(ckpt)
    assert info.loaded and info.model_version == 1 and info.architecture == "gpt"
    assert info.max_sequence_length == 64 and info.tokenizer.vocab_size == tok.vocab_size
    assert info.tokenizer.eos_token_id == tok.end_id and info.weights_sha256 == ck.sha256
    assert info.parameter_count > 0 and json.loads(info.config_json)["d_model"] == 32
    assert info.loaded_at.seconds > 0 and info.device == "cpu" and info.dtype == "float32"


def test_generate_token_text_and_chat_prompts(server, model0, tok):
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "How was the film?"}]
    res = server.client.generate([[5, 6, 7, 8], "How was the film?", chat], n=2, max_new_tokens=10, seed=3,
                                 temperature=0.9, top_k=50)
    assert res.model_version == 1
    prompts = [[5, 6, 7, 8], tok.prompt_ids("How was the film?"), tok.prompt_ids("How was the film?", "be kind")]
    for r, p in zip(res.results, prompts):
        assert list(r.prompt_token_ids) == p
        check_completions(r.completions, reference(model0, tok, p, 10, 3, 2, temperature=0.9, top_k=50), tok)
    # a raw text prompt is tokenised as is (no chat template)
    raw = server.client.stub.Generate(policy_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text="the film was")], sampling=sampling_params(4, seed=1)), timeout=WAIT)
    assert list(raw.results[0].prompt_token_ids) == tok.encode("the film was")
    check_completions(raw.results[0].completions, reference(model0, tok, tok.encode("the film was"), 4, 1), tok)
    # the default max_new_tokens (0) is the server limit, capped by the room the prompt leaves
    long = server.client.generate([[5] * 60], seed=0)
    assert len(long.results[0].completions[0].token_ids) <= 4
    greedy = server.client.generate([[5]], max_new_tokens=6, seed=0, temperature=0).results[0].completions
    check_completions(greedy, reference(model0, tok, [5], 6, 0, temperature=0.0), tok)


def test_generate_stream(server, model0, tok):
    prompt = tok.prompt_ids("Tell me about the story.")
    msgs = list(server.client.generate_stream(prompt, max_new_tokens=12, seed=4))
    deltas, end = msgs[:-1], msgs[-1]
    assert all(m.WhichOneof("event") == "delta" for m in deltas) and end.WhichOneof("event") == "end"
    assert all(m.model_version == 1 for m in msgs)
    toks = [t for m in deltas for t in m.delta.token_ids]
    ref = reference(model0, tok, prompt, 12, 4)[0]
    assert toks == list(end.end.token_ids) == ref.tokens
    assert "".join(m.delta.text for m in deltas) == end.end.text == tok.decode(ref.tokens)
    assert list(end.end.prompt_token_ids) == prompt
    # a stop string cuts the text; the streamed text never shows it
    text = end.end.text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    msgs = list(server.client.generate_stream(prompt, max_new_tokens=12, seed=4, stop=[stop]))
    assert msgs[-1].end.finish_reason == common_pb2.FINISH_REASON_STOP
    assert msgs[-1].end.text == text[:text.find(stop)] == "".join(m.delta.text for m in msgs[:-1])
    code, msg = rpc_error(lambda: list(server.client.stub.GenerateStream(policy_pb2.GenerateStreamRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5])),
        sampling=common_pb2.SamplingParams(n=2)), timeout=WAIT)))
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("sampling.n")
    code, msg = rpc_error(lambda: list(server.client.stub.GenerateStream(policy_pb2.GenerateStreamRequest(),
                                                                         timeout=WAIT)))
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("prompt")


def _gen(prompts=None, **sp):
    if prompts is None:
        prompts = [common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5, 6]))]
    return policy_pb2.GenerateRequest(prompts=prompts, sampling=common_pb2.SamplingParams(**sp))


def _ids(*ids):
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(ids)))


def test_generate_validation(server, tok):
    nan = float("nan")
    V = tok.vocab_size
    chat_bad_role = common_pb2.Prompt(chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(content="x")]))
    cases = [
        (_gen([]), "prompts"),
        (_gen([common_pb2.Prompt()]), "prompts[0].input"),
        (_gen([_ids(5), _ids(5, V)]), "prompts[1].token_ids.ids[1]"),
        (_gen([_ids(-1)]), "prompts[0].token_ids.ids[0]"),
        (_gen([common_pb2.Prompt(token_ids=common_pb2.TokenIds())]), "prompts[0].token_ids.ids"),
        (_gen([common_pb2.Prompt(text="")]), "prompts[0].text"),
        (_gen([common_pb2.Prompt(chat=common_pb2.Conversation())]), "prompts[0].chat.messages"),
        (_gen([chat_bad_role]), "prompts[0].chat.messages[0].role"),
        (_gen([_ids(*[5] * 60)], max_new_tokens=10), "prompts[0]"),
        (_gen([_ids(*[5] * 64)]), "prompts[0]"),
        (_gen(max_new_tokens=-1), "sampling.max_new_tokens"),
        (_gen(max_new_tokens=33), "sampling.max_new_tokens"),
        (_gen(temperature=nan), "sampling.temperature"),
        (_gen(temperature=-0.5), "sampling.temperature"),
        (_gen(temperature=float("inf")), "sampling.temperature"),
        (_gen(top_p=0.0), "sampling.top_p"),
        (_gen(top_p=1.5), "sampling.top_p"),
        (_gen(top_p=nan), "sampling.top_p"),
        (_gen(top_k=-1), "sampling.top_k"),
        (_gen(top_k=V + 1), "sampling.top_k"),
        (_gen(n=-1), "sampling.n"),
        (_gen(n=65), "sampling.n"),
        (_gen(stop=["ok", ""]), "sampling.stop[1]"),
    ]
    for req, field in cases:
        code, msg = rpc_error(server.client.stub.Generate, req, timeout=WAIT)
        assert code == CODE.INVALID_ARGUMENT, (field, code, msg)
        assert msg.startswith(field), (field, msg)
        assert "Traceback" not in msg
    code, msg = rpc_error(server.client.generate, [[5]], expected_model_version=7)
    assert code == CODE.FAILED_PRECONDITION and "expected_model_version" in msg
    assert server.client.generate([[5]], max_new_tokens=1, expected_model_version=1).model_version == 1
    code, msg = rpc_error(server.client.generate, [[5]] * 20, n=64)
    assert code == CODE.RESOURCE_EXHAUSTED
    assert server.client.health() == "SERVING"  # still alive after all that


def test_dynamic_batching_metrics_and_backpressure(server, model0, tok):
    eng = server.engine
    before = eng.stats
    eng.pause()  # all 8 calls queue up, then decode together
    prompts = [tok.prompt_ids(q) for q in ("How was the film?", "hello", "Did you like the cast?", "hi")] * 2
    out = [None] * 8

    def call(i):
        out[i] = server.client.generate([prompts[i]], max_new_tokens=6, seed=i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: eng.stats.queue_depth == 8, what="8 queued requests")
        # backpressure: with the queue at its bound, one more request fails at once
        eng.max_queue = 8
        code, msg = rpc_error(server.client.generate, [[5]], max_new_tokens=1)
        assert code == CODE.RESOURCE_EXHAUSTED and "queue" in msg
    finally:
        eng.max_queue = 256
        eng.resume()
    for t in threads:
        t.join(WAIT)
    after = eng.stats
    for i, r in enumerate(out):
        check_completions(r.results[0].completions, reference(model0, tok, prompts[i], 6, i), tok)
    tokens = after.tokens_generated - before.tokens_generated
    passes = after.forward_passes - before.forward_passes
    assert passes <= 6 < tokens  # one prefill + at most 5 decode steps served all 8 requests
    assert after.max_batch_size_seen >= 8
    text = server.metrics()
    for name in ("chatrl_policy_tokens_generated_total", "chatrl_policy_batch_size_bucket",
                 "chatrl_policy_queue_depth", "chatrl_policy_model_version 1.0", "chatrl_policy_forward_passes_total",
                 'chatrl_policy_rpc_requests_total{code="RESOURCE_EXHAUSTED",method="Generate"}',
                 'chatrl_policy_rpc_requests_total{code="OK",method="Generate"}',
                 "chatrl_policy_rpc_latency_seconds_bucket", 'chatrl_policy_samples_total{finish_reason='):
        assert name in text, name
    tok_line = next(x for x in text.splitlines() if x.startswith("chatrl_policy_tokens_generated_total "))
    assert float(tok_line.split()[1]) == after.tokens_generated  # this server generated nothing else


def test_cancel_and_deadline_free_the_engine(server):
    eng = server.engine
    cancelled, tokens0 = eng.stats.requests_cancelled, eng.stats.tokens_generated
    # deadline: a queued request whose deadline passes leaves the queue
    eng.pause()
    try:
        fut = server.client.stub.Generate.future(_gen(max_new_tokens=4), timeout=3)
        wait_for(lambda: eng.stats.queue_depth == 1, what="the request to be queued")
        assert fut.exception(WAIT).code() == CODE.DEADLINE_EXCEEDED
        wait_for(lambda: eng.stats.queue_depth == 0 and eng.stats.requests_cancelled == cancelled + 1,
                 what="the expired request to leave the queue")
    finally:
        eng.resume()
    cancelled = eng.stats.requests_cancelled
    # a client cancelling a stream mid-way: its row leaves the batch
    go, hook = threading.Event(), eng.on_step

    def gate(info):  # the decode thread holds after each step until the client has cancelled
        hook(info)
        go.wait(WAIT)

    eng.on_step = gate
    try:
        call = server.client.stub.GenerateStream(policy_pb2.GenerateStreamRequest(
            prompt=_ids(5, 6), sampling=common_pb2.SamplingParams(max_new_tokens=32, seed=1)), timeout=WAIT)
        next(call)
        call.cancel()
        wait_for(lambda: eng.stats.requests_cancelled >= cancelled + 1, what="the server to see the cancel")
    finally:
        go.set()
        eng.on_step = hook
    wait_for(lambda: eng.stats.active_rows == 0, what="the cancelled stream to leave the batch")
    assert eng.stats.tokens_generated - tokens0 < 32  # neither the expired request nor the stream ran out
    assert server.client.generate([[5]], max_new_tokens=2).results[0].completions


def _chunks(payload: bytes, version: int, size: int = 4096, sha: str | None = None, total: int | None = None,
            offsets=None, **kw):
    sha = sha or hashlib.sha256(payload).hexdigest()
    total = len(payload) if total is None else total
    fmt = kw.pop("format", "safetensors")
    for k, off in enumerate(range(0, len(payload), size)):
        o = offsets(k, off) if offsets else off
        yield policy_pb2.UpdateWeightsRequest(chunk=policy_pb2.WeightsChunk(
            version=version, sha256=sha, total_bytes=total, offset=o, data=payload[off:off + size],
            format=fmt, **(kw if k == 0 else {})))


def test_update_weights_swaps_with_requests_in_flight(make_server, ckpt, model0, model1, tok):
    s = make_server(checkpoint=str(ckpt))
    eng = s.engine
    prompt = tok.prompt_ids("How was the film?")
    # auth: UpdateWeights needs the bearer token
    code, _ = rpc_error(s.anon.update_weights, model1.state_dict(), 2)
    assert code == CODE.UNAUTHENTICATED
    assert eng.version == 1

    reached, go = threading.Event(), threading.Event()
    metrics_hook, steps = eng.on_step, []

    def gate(info):
        metrics_hook(info)
        steps.append(info)
        if len(steps) == 2:
            reached.set()
            go.wait(WAIT)

    eng.on_step = gate
    out = {}
    ta = threading.Thread(target=lambda: out.setdefault("a", s.client.generate([prompt], n=2, max_new_tokens=12,
                                                                                 seed=9)))
    ta.start()
    assert reached.wait(WAIT)  # request a is decoding on version 1
    try:
        r = s.client.update_weights(model1.state_dict(), 2, chunk_bytes=4096, metadata={"stage": "ppo"})
        assert r.model_version == 2 and r.previous_model_version == 1
        assert r.sha256 == hashlib.sha256(serialize_weights(model1.state_dict())).hexdigest()
        assert r.bytes_received > 4096  # several chunks
        info = s.client.model_info()
        assert info.model_version == 2 and info.checkpoint_uri == "push:2" and info.weights_sha256 == r.sha256
        tb = threading.Thread(target=lambda: out.setdefault("b", s.client.generate([prompt], n=2, max_new_tokens=12,
                                                                                     seed=9)))
        tb.start()
        wait_for(lambda: eng.stats.queue_depth == 1, what="b to queue behind the draining batch")
    finally:
        go.set()
    ta.join(WAIT)
    tb.join(WAIT)
    a, b = out["a"], out["b"]
    assert a.model_version == 1 and b.model_version == 2
    check_completions(a.results[0].completions, reference(model0, tok, prompt, 12, 9, 2), tok)
    check_completions(b.results[0].completions, reference(model1, tok, prompt, 12, 9, 2), tok)
    assert "chatrl_policy_model_version 2.0" in s.metrics()
    assert 'chatrl_policy_weight_updates_total{outcome="ok"} 1.0' in s.metrics()
    # further pushes of the same size reuse the server's staging buffer and retired models: each version
    # still serves exactly its own weights
    for version, (m, sd) in enumerate([(model0, model0.state_dict()), (model1, model1.state_dict()),
                                        (model0, model0.state_dict())], start=3):
        assert s.client.update_weights(sd, version).model_version == version
        wait_for(lambda v=version: eng.active_version == v, what=f"version {version} to become active")
        got = s.client.generate([prompt], n=2, max_new_tokens=12, seed=9)
        assert got.model_version == version
        check_completions(got.results[0].completions, reference(m, tok, prompt, 12, 9, 2), tok)


def test_update_weights_rejects_bad_uploads(make_server, ckpt, model1, tok):
    s = make_server(checkpoint=str(ckpt))
    stub, md = s.client.stub, s.client._md
    good = serialize_weights(model1.state_dict())

    def upload(chunks):
        return rpc_error(stub.UpdateWeights, chunks, metadata=md, timeout=WAIT)

    cases = [
        (_chunks(good, 1), CODE.FAILED_PRECONDITION, "chunk.version"),
        (_chunks(good, 0), CODE.INVALID_ARGUMENT, "chunk.version"),
        (_chunks(good, 2, sha="0" * 64), CODE.INVALID_ARGUMENT, "chunk.sha256"),
        (_chunks(good, 2, sha="xyz"), CODE.INVALID_ARGUMENT, "chunk.sha256"),
        (_chunks(good, 2, total=len(good) + 10), CODE.INVALID_ARGUMENT, "chunk.total_bytes"),
        (_chunks(good, 2, total=len(good) - 10), CODE.INVALID_ARGUMENT, "chunk.data"),
        (_chunks(good, 2, offsets=lambda k, off: off + (1 if k == 2 else 0)), CODE.INVALID_ARGUMENT, "chunk.offset"),
        (_chunks(b"\x00" * 64 + b"not safetensors", 2), CODE.INVALID_ARGUMENT, "chunk.data"),
        (iter([]), CODE.INVALID_ARGUMENT, "chunk"),
    ]
    import pickle

    cases.append((_chunks(pickle.dumps(model1.state_dict()), 2), CODE.INVALID_ARGUMENT, "chunk.data"))
    wrong = serialize_weights({**model1.state_dict(), "ln_f.weight": torch.ones(7)})
    cases.append((_chunks(wrong, 2), CODE.INVALID_ARGUMENT, "chunk.data"))
    nan_sd = {**model1.state_dict(), "ln_f.bias": torch.full((32,), float("nan"))}
    cases.append((_chunks(serialize_weights(nan_sd), 2), CODE.INVALID_ARGUMENT, "chunk.data"))
    cases.append((_chunks(good, 2, format="pickle"), CODE.INVALID_ARGUMENT, "chunk.format"))
    for chunks, code, field in cases:
        got, msg = upload(chunks)
        assert got == code and msg.startswith(field), (field, got, msg)
    assert s.engine.version == 1 and s.client.model_info().model_version == 1
    assert s.client.generate([[5]], max_new_tokens=2).model_version == 1
    assert 'chatrl_policy_weight_updates_total{outcome="rejected"}' in s.metrics()


def test_start_empty_then_first_model_by_upload(make_server, model0, tok):
    s = make_server()
    assert s.client.health() == "NOT_SERVING"
    info = s.client.model_info()
    assert not info.loaded and info.model_version == 0
    code, msg = rpc_error(s.client.generate, [[5]])
    assert code == CODE.FAILED_PRECONDITION and "no model loaded" in msg
    code, msg = rpc_error(s.client.update_weights, model0.state_dict(), 1)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("chunk.metadata")
    meta = {"config_json": json.dumps(model0.cfg.to_dict()), "tokenizer_json": tok.to_str()}
    r = s.client.update_weights(model0.state_dict(), 1, metadata=meta)
    assert r.model_version == 1 and r.previous_model_version == 0
    assert s.client.health() == "SERVING"
    res = s.client.generate(["How was the film?"], max_new_tokens=5, seed=2)
    check_completions(res.results[0].completions, reference(model0, tok, tok.prompt_ids("How was the film?"), 5, 2),
                      tok)
    assert s.client.model_info().tokenizer.vocab_size == tok.vocab_size


def test_python_dash_m_serves_until_sigterm(ckpt, tmp_path):
    port = free_port()
    with Process.module("chatrl.services.policy", "--checkpoint", str(ckpt), "--port", str(port),
                        "--set", "max_new_tokens=16", log=tmp_path / "policy.log") as p:
        with PolicyClient(f"127.0.0.1:{port}", token="", retries=1, timeout=WAIT) as c:
            c.wait_serving(timeout=120)
            res = c.generate(["hello"], max_new_tokens=3, seed=1)
            assert res.model_version == 1 and len(res.results[0].completions[0].token_ids) <= 3
        assert p.stop() == 0, p.output()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        PolicyConfig(dtype="int4")
    with pytest.raises(ValueError, match="max_batch_size"):
        replace(PolicyConfig(), max_batch_size=0)


def test_replica_group_reaches_every_replica_as_they_come_and_go(make_server, ckpt, model0, model1, tok):
    """UpdateWeights through a ReplicaGroup lands on every replica the name resolves to — including one that
    joined with no model (the push carries config and tokenizer) — and a replica that left is no error,
    while one that is still listed but failing is. (DNS is the one thing substituted: the resolver.)"""
    from chatrl.clients.lib import ReplicaError, ReplicaGroup, replica_addresses

    assert "127.0.0.1:50051" in replica_addresses("localhost:50051")
    assert replica_addresses("no-such-host.invalid:7") == ["no-such-host.invalid:7"]

    a, b = make_server(checkpoint=str(ckpt)), make_server(checkpoint=str(ckpt))
    pods = [a.address, b.address]
    group = ReplicaGroup(PolicyClient, "policy-pods:50051", resolve=lambda _addr: list(pods), token=TOKEN,
                         retries=1, timeout=WAIT)
    meta = {"config_json": json.dumps(model1.cfg.to_dict()), "tokenizer_json": tok.to_str()}
    try:
        out = group.update_weights(model1.state_dict(), 2, metadata=meta)
        assert {k: r.model_version for k, r in out.items()} == {a.address: 2, b.address: 2}
        c = make_server()  # scaled up: a fresh replica with no model
        pods.append(c.address)
        assert group.model_versions() == {a.address: 2, b.address: 2, c.address: 0}
        packed = group._payload  # the packed bytes, kept for the next push of the same model
        group.update_weights(model0.state_dict(), 3, metadata=meta)
        assert set(group.model_versions().values()) == {3} and group._payload is packed  # reused, not a new one
        for s in (a, b, c):
            wait_for(lambda s=s: s.engine.active_version == 3, what="version 3 active")
            got = s.client.generate([[5, 6]], max_new_tokens=6, seed=4)
            check_completions(got.results[0].completions, reference(model0, tok, [5, 6], 6, 4), tok)
        # b is scaled down: gone from DNS and stopped — not an error
        pods.remove(b.address)
        b.srv.stop(0)
        # a one-off push (the pipeline's seeding: labels and the RM come before the next) keeps no buffer
        assert set(group.update_weights(model1.state_dict(), 4, metadata=meta, keep_buffer=False)) == {
            a.address, c.address} and group._payload is None
        # a replica that is still listed but refuses (stale version) is an error naming it
        a.client.update_weights(model1.state_dict(), 9)
        with pytest.raises(ReplicaError, match=a.address) as err:
            group.update_weights(model0.state_dict(), 5, metadata=meta)
        assert set(err.value.failures) == {a.address}
        assert c.engine.version == 5  # the healthy replica still got it
    finally:
        group.close()
