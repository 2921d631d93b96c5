"""The feedback service through real gRPC on 127.0.0.1: every RPC, every error status, auth, metrics,
the labeling page, ``python -m chatrl.services.feedback``, and CreateComparisonTasks against a real
policy-inference server over a tiny GPT."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from kit import Process, env_var, free_port, rpc_error, tiny_checkpoint, wait_for

from chatrl.clients.lib import FeedbackClient, PolicyClient, chat_message
from chatrl.services.core import formats
from chatrl.services.feedback.server import FeedbackConfig, build
from chatrl.services.policy.server import PolicyConfig
from chatrl.services.policy.server import build as build_policy
from chatrl.services.proto.chatrl.v1 import common_pb2, feedback_pb2
from chatrl.services.runtime.server import ServerConfig

TOKEN = "feedback-test-token"
TOKEN_ENV = "CHATRL_FEEDBACK_TEST_TOKEN"
CODE = grpc.StatusCode


# -- a real policy-inference server over a tiny GPT (read-only: sampling does not change it) --------

@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The real policy-inference server over the tiny GPT: (address, servicer)."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("policy-ckpt"))
    srv, svc = build_policy(ServerConfig(port=0, auth_token_env=""),
                            PolicyConfig(checkpoint=str(ckpt), max_new_tokens=32))
    yield srv.address, svc
    srv.stop(0)
    svc.close()


# -- the feedback server: a fresh one (own database, own metrics) for every test -------------------

def _feedback(tmp: Path, policy_address: str, metrics_port: int = -1, **kw):
    with env_var(TOKEN_ENV, TOKEN):
        cfg = FeedbackConfig(db=str(tmp / "feedback.db"), policy_address=policy_address, **kw)
        return build(ServerConfig(port=0, metrics_port=metrics_port, auth_token_env=TOKEN_ENV, grace_seconds=1), cfg)


@pytest.fixture()
def fb(tmp_path, policy):
    srv, svc = _feedback(tmp_path, policy[0], metrics_port=0, export_batch_lines=2)
    yield SimpleNamespace(address=srv.address, metrics_port=srv.metrics_port, store=svc.store)
    srv.stop(0)
    svc.close()


@pytest.fixture()
def client(fb):
    with FeedbackClient(fb.address, token=TOKEN, retries=1, timeout=60) as c:
        yield c


@pytest.fixture()
def anon(fb):
    with FeedbackClient(fb.address, token="", retries=1, timeout=10) as c:
        yield c


_code = rpc_error


# -- tests -----------------------------------------------------------------------------------------

def test_health_and_reflection(fb, client):
    assert client.health() == "SERVING"
    assert client.health("chatrl.v1.FeedbackService") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "chatrl.v1.FeedbackService" in {s.name for s in resp.list_services_response.service}


def test_add_prompts(client):
    r = client.add_prompts(["Tell me about the film.", "Was the cast good?", "Tell me about the film."], source="t")
    assert r.added == 2 and r.prompt_ids[0] == r.prompt_ids[2] != r.prompt_ids[1]
    assert client.add_prompts(["Was the cast good?"]).added == 0
    code, msg = _code(client.stub.AddPrompts, feedback_pb2.AddPromptsRequest(), metadata=client._md)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("prompts")
    code, msg = _code(client.add_prompts, ["ok", "  "])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("prompts[1].text")


def test_create_comparison_tasks_samples_from_policy(client, policy):
    (pid,) = client.add_prompts(["How was the story?"]).prompt_ids
    req = feedback_pb2.CreateComparisonTasksRequest(
        prompts=["What did you think of the movie?", "Did you like the cast?"], prompt_ids=[pid], k=3,
        sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=1.0, seed=123))
    r = client.stub.CreateComparisonTasks(req, metadata=client._md, timeout=60)
    assert len(r.task_ids) == 3 and r.policy_model_version >= 1
    # the stored responses are exactly what the policy samples for these prompts and seeds
    with PolicyClient(policy[0], token="") as pc:
        ref = pc.generate(["What did you think of the movie?", "Did you like the cast?", "How was the story?"],
                          n=3, max_new_tokens=8, temperature=1.0, seed=123)
    lines = [json.loads(x) for x in client.export("prompts")]
    assert {"What did you think of the movie?", "Did you like the cast?"} <= {x["text"] for x in lines}
    seen = {}
    for _ in range(3):
        t = client.next_task("policy-check").task
        seen[t.task_id] = t
        client.submit_ranking(f"pc-{t.task_id}", t.task_id, "policy-check", [0, 1, 2])
    for tid, res in zip(r.task_ids, ref.results):
        t = seen[tid]
        assert list(t.responses) == [c.text for c in res.completions]
        assert t.policy_model_version == r.policy_model_version
    assert t.prompt == "How was the story?" and t.prompt_id == pid
    assert len({x for t in seen.values() for x in t.responses}) > 1  # real samples, not one canned answer


def test_create_comparison_tasks_errors(client, tmp_path):
    def create(**kw):
        return client.stub.CreateComparisonTasks(feedback_pb2.CreateComparisonTasksRequest(**kw),
                                                  metadata=client._md, timeout=30)

    code, msg = _code(create, prompts=["hi"], k=1)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("k:")
    code, msg = _code(create, prompts=["hi"], k=99)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("k:")
    code, msg = _code(create, k=2)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("prompts")
    code, msg = _code(create, prompts=[""], k=2)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("prompts[0]")
    code, msg = _code(create, prompt_ids=["p_nope"], k=2)
    assert code == CODE.NOT_FOUND and "prompt_ids[0]" in msg
    code, msg = _code(create, prompts=["hi"], k=2, sampling=common_pb2.SamplingParams(top_p=5.0))
    assert code == CODE.INVALID_ARGUMENT and "sampling" in msg and "policy-inference" in msg
    # policy-inference down → UNAVAILABLE, nothing stored
    (tmp_path / "down").mkdir()
    srv, svc = _feedback(tmp_path / "down", f"127.0.0.1:{free_port()}", policy_timeout_s=5)
    try:
        with FeedbackClient(srv.address, token=TOKEN, retries=1) as c:
            code, msg = _code(c.create_comparison_tasks, ["hi"], 2)
            assert code == CODE.UNAVAILABLE and "policy-inference" in msg
            assert c.stats().tasks == 0
    finally:
        srv.stop(0)
        svc.close()


_made_prompts: dict[str, str] = {}


def _make_task(fb, k=3) -> str:
    """A task with ready responses, straight through the server's store (no policy needed)."""
    prompt = f"prompt {random.random()}"
    tid = fb.store.create_tasks([{"prompt": prompt, "responses": [f"r{i}" for i in range(k)]}],
                                policy_model_version=5)[0]
    _made_prompts[tid] = prompt
    return tid


def test_next_task_and_submit_ranking(fb, client, anon):
    t1, t2 = _make_task(fb), _make_task(fb, k=2)
    r = client.next_task("alice")
    assert r.task.task_id == t1 and r.remaining == 1 and len(r.task.responses) == 3
    assert r.task.lease_expires_at.seconds > r.task.created_at.seconds and r.task.policy_model_version == 5
    assert client.next_task("alice").task.task_id == t1  # the same lease again
    assert client.next_task("bob").task.task_id == t2
    assert not client.next_task("carol").HasField("task")
    s = client.submit_ranking("sub-a", t1, "alice", [2, 0, 1])
    assert not s.duplicate and s.pairs == 3 and s.ranking_id
    again = client.submit_ranking("sub-a", t1, "alice", [2, 0, 1])
    assert again.duplicate and again.ranking_id == s.ranking_id
    code, msg = _code(client.submit_ranking, "sub-a", t1, "alice", [0, 1, 2])
    assert code == CODE.ALREADY_EXISTS and "submission_id" in msg
    code, msg = _code(client.submit_ranking, "sub-b", t1, "alice", [0, 1, 2])
    assert code == CODE.ALREADY_EXISTS and "task_id" in msg
    code, msg = _code(client.submit_ranking, "sub-c", t2, "bob", [0, 0])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("ranking") and "duplicates [0]" in msg \
        and "missing [1]" in msg
    code, msg = _code(client.submit_ranking, "sub-c", t2, "bob", [0])
    assert code == CODE.INVALID_ARGUMENT and "missing [1]" in msg
    code, msg = _code(client.submit_ranking, "sub-c", "t_nope", "bob", [0, 1])
    assert code == CODE.NOT_FOUND and "task_id" in msg
    code, msg = _code(client.submit_ranking, "", t2, "bob", [0, 1])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("submission_id")
    code, msg = _code(client.submit_ranking, "sub-c", t2, "", [0, 1])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("labeler_id")
    code, msg = _code(client.next_task, "")
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("labeler_id")
    assert client.submit_ranking("sub-c", t2, "bob", [1, 0]).pairs == 1


def test_submit_demonstration(client):
    msgs = [{"role": "system", "content": "Be warm."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"}]
    d = client.submit_demonstration("demo-1", "alice", msgs)
    assert not d.duplicate and d.demonstration_id
    assert client.submit_demonstration("demo-1", "alice", msgs).demonstration_id == d.demonstration_id
    code, msg = _code(client.submit_demonstration, "demo-1", "alice", msgs[:2] + [{"role": "assistant",
                                                                                    "content": "Other."}])
    assert code == CODE.ALREADY_EXISTS and "submission_id" in msg
    code, msg = _code(client.submit_demonstration, "demo-2", "alice", msgs[:2])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("messages[1].role")
    code, msg = _code(client.submit_demonstration, "demo-2", "alice", [])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("messages")
    code, msg = _code(client.submit_demonstration, "demo-2", "alice", [msgs[1], {"role": "assistant", "content": ""}])
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("messages[1].content")
    bad = feedback_pb2.SubmitDemonstrationRequest(submission_id="demo-2", labeler_id="alice", messages=[
        common_pb2.ChatMessage(content="x"), chat_message("assistant", "y")])
    code, msg = _code(client.stub.SubmitDemonstration, bad, metadata=client._md)
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("messages[0].role")


def test_auth_on_mutating_rpcs(fb, anon):
    task = _make_task(fb, k=2)
    calls = [
        lambda c: c.add_prompts(["needs a token"]),
        lambda c: c.create_comparison_tasks(["needs a token"], 2),
        lambda c: c.next_task("eve"),  # leases a task: a write
        lambda c: c.submit_ranking("auth-1", task, "eve", [0, 1]),
        lambda c: c.submit_demonstration("auth-2", "eve", [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]),
    ]
    with FeedbackClient(fb.address, token="wrong", retries=1) as wrong:
        for call in calls:
            for c in (anon, wrong):
                code, msg = _code(call, c)
                assert code == CODE.UNAUTHENTICATED and "Bearer" in msg
    # reads need no token; none of the refused writes left a trace
    st = anon.stats()
    # (the one prompt is the task's own)
    assert (st.tasks, st.open_tasks, st.prompts, st.rankings, st.demonstrations) == (1, 1, 1, 0, 0)
    assert [json.loads(x)["text"] for x in anon.export("prompts")] == [_made_prompts[task]]


def test_export_and_stats(fb, client, tmp_path):
    # this test's own records: 3 prompts, 2 ranked tasks (+1 open), 1 demonstration
    client.add_prompts(["How was the film?", "Was the cast good?", "Tell me about the story."])
    t1, t2, _open = _make_task(fb, k=3), _make_task(fb, k=2), _make_task(fb, k=2)
    client.next_task("alice"), client.next_task("bob")
    client.submit_ranking("s1", t1, "alice", [2, 0, 1])
    client.submit_ranking("s2", t2, "bob", [1, 0])
    client.submit_demonstration("d1", "alice", [{"role": "user", "content": "Hi?"},
                                                {"role": "assistant", "content": "Hello."}])
    st = client.stats()
    # _make_task's prompts are prompts too: 3 added + 3 from the tasks
    assert (st.prompts, st.tasks, st.open_tasks, st.rankings, st.demonstrations) == (6, 3, 1, 2, 1)
    for kind, loader in (("rankings", formats.load_rankings), ("demonstrations", formats.load_sft),
                         ("prompts", formats.load_prompts)):
        lines = client.export(kind)
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        assert len(loader(path)) == len(lines) == getattr(st, kind)
    rows = [json.loads(x) for x in client.export("rankings")]
    assert [(r["task_id"], r["ranking"], r["labeler_id"]) for r in rows] == [(t1, [2, 0, 1], "alice"),
                                                                               (t2, [1, 0], "bob")]
    assert {"ranking_id", "task_id", "prompt_id", "labeler_id", "submission_id", "policy_model_version",
            "created_at", "finished"} <= set(rows[0])
    # batching (export_batch_lines=2), limit, since
    msgs = list(client.stub.Export(feedback_pb2.ExportRequest(kind=feedback_pb2.EXPORT_KIND_PROMPTS)))
    assert [len(m.lines) for m in msgs] == [2, 2, 2]
    assert len(client.export("prompts", limit=2)) == 2
    # pairs (TRL / OpenRLHF's prompt/chosen/rejected): C(3,2) + C(2,2); a ranking's pairs share one message
    msgs = list(client.stub.Export(feedback_pb2.ExportRequest(kind=feedback_pb2.EXPORT_KIND_PAIRS)))
    assert [len(m.lines) for m in msgs] == [3, 1] and [m.next_after_sequence for m in msgs] == \
        [rows[0]["sequence"], rows[1]["sequence"]]
    pairs = [json.loads(ln) for m in msgs for ln in m.lines]
    r1 = rows[0]["responses"]  # ranked [2, 0, 1]: 2 > 0 > 1
    assert [(x["chosen"], x["rejected"]) for x in pairs[:3]] == [(r1[0], r1[1]), (r1[2], r1[0]), (r1[2], r1[1])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(client.export("pairs")) + "\n")
    assert len(formats.load_pairs(path)) == 4 and pairs[0]["ranking_id"] == rows[0]["ranking_id"]
    future = Timestamp(seconds=4_000_000_000)
    assert list(client.stub.Export(feedback_pb2.ExportRequest(kind=feedback_pb2.EXPORT_KIND_RANKINGS,
                                                              since=future))) == []
    past = Timestamp(seconds=1)
    got = [ln for m in client.stub.Export(feedback_pb2.ExportRequest(kind=feedback_pb2.EXPORT_KIND_RANKINGS,
                                                                     since=past)) for ln in m.lines]
    assert len(got) == st.rankings
    # since is inclusive of the record's own created_at
    mid = rows[1]["created_at"]
    ts = Timestamp()
    ts.FromJsonString(mid)
    got = [json.loads(ln)["ranking_id"] for m in client.stub.Export(feedback_pb2.ExportRequest(
        kind=feedback_pb2.EXPORT_KIND_RANKINGS, since=ts)) for ln in m.lines]
    assert got == [r["ranking_id"] for r in rows if r["created_at"] >= mid] and rows[1]["ranking_id"] in got
    code, msg = _code(lambda: list(client.stub.Export(feedback_pb2.ExportRequest())))
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("kind")
    code, msg = _code(lambda: list(client.stub.Export(feedback_pb2.ExportRequest(
        kind=feedback_pb2.EXPORT_KIND_PROMPTS, limit=-1))))
    assert code == CODE.INVALID_ARGUMENT and msg.startswith("limit")


def test_metrics(fb, client):
    task = _make_task(fb, k=2)
    client.next_task("metrics")
    client.submit_ranking("metric-1", task, "metrics", [1, 0])
    client.submit_ranking("metric-1", task, "metrics", [1, 0])  # a retry: a duplicate, not a second label
    _make_task(fb, k=2)  # one task left open
    body = urllib.request.urlopen(f"http://127.0.0.1:{fb.metrics_port}/metrics", timeout=10).read().decode()
    val = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
           if ln and not ln.startswith("#")}
    assert val['chatrl_feedback_labels_submitted_total{kind="ranking"}'] == 1
    assert val['chatrl_feedback_duplicate_submissions_total{kind="ranking"}'] == 1
    assert val["chatrl_feedback_open_tasks"] == 1
    assert val['chatrl_feedback_records{kind="rankings"}'] == 1
    assert val['chatrl_feedback_rpc_requests_total{code="OK",method="SubmitRanking"}'] == 2


def test_labeling_page(tmp_path):
    srv, svc = _feedback(tmp_path, "127.0.0.1:1", web_port=0)
    try:
        base = svc.web.url.rstrip("/")
        (tid,) = svc.store.create_tasks([{"prompt": "Rank <b>these</b>", "responses": ["one", "two", "three"],
                                          "finished": [True, False, True]}])

        def req(path, body=None, token=TOKEN):
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            data = json.dumps(body).encode() if body is not None else None
            try:
                with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers),
                                            timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, page = req("/")
        assert status == 200 and "chatrl labeling" in page and "/static/app.js" in page
        assert "/api/rankings" in req("/static/app.js")[1]
        assert req("/api/next?labeler_id=web-alice", token="")[0] == 401  # leasing needs the token too
        status, body = req("/api/next?labeler_id=web-alice")
        task = json.loads(body)["task"]
        assert status == 200 and task["task_id"] == tid and task["responses"] == ["one", "two", "three"]
        assert task["finished"] == [True, False, True]
        sub = {"submission_id": "web-1", "task_id": tid, "labeler_id": "web-alice", "ranking": [1, 2, 0]}
        assert req("/api/rankings", sub, token="")[0] == 401
        assert req("/api/rankings", sub, token="nope")[0] == 401
        status, body = req("/api/rankings", {**sub, "ranking": [1, 1, 0]})
        assert status == 400 and json.loads(body)["error"].startswith("ranking") and "duplicates [1]" in body
        assert req("/api/rankings", {**sub, "task_id": "t_nope"})[0] == 404
        assert req("/api/next?labeler_id=")[0] == 400
        status, body = req("/api/rankings", sub)
        assert status == 200 and json.loads(body)["pairs"] == 3 and not json.loads(body)["duplicate"]
        assert json.loads(req("/api/rankings", sub)[1])["duplicate"] is True
        assert req("/api/rankings", {**sub, "ranking": [0, 1, 2]})[0] == 409
        assert json.loads(req("/api/next?labeler_id=web-alice")[1]) == {"task": None, "remaining": 0}
        assert json.loads(req("/api/stats")[1])["rankings"] == 1
        assert req("/nope")[0] == 404
        # the same store behind gRPC
        with FeedbackClient(srv.address, token=TOKEN) as c:
            row = json.loads(c.export("rankings")[0])
            assert row["ranking"] == [1, 2, 0] and row["submission_id"] == "web-1"
    finally:
        srv.stop(0)
        svc.close()


def test_python_m_serves_until_sigterm(tmp_path):
    db = tmp_path / "cli.db"
    with Process.module("chatrl.services.feedback", "--db", str(db), "--port", "0", "--set", "host=127.0.0.1",
                        log=tmp_path / "feedback.log", env={"CHATRL_AUTH_TOKEN": TOKEN}) as p:
        line = wait_for(lambda: next((ln for ln in p.output().splitlines() if "feedback serving on" in ln), None)
                        or (not p.alive() and "exited: " + p.output()), what="the serving line")
        assert "feedback serving on 127.0.0.1:" in line, line
        addr = line.split("serving on ")[1].split()[0]
        with FeedbackClient(addr, token=TOKEN) as c:
            c.wait_serving(30)
            assert c.add_prompts(["from the CLI"]).added == 1
        assert p.stop() == 0, p.output()
    from chatrl.services.core.feedback_store import FeedbackStore

    with FeedbackStore(db) as s:
        assert [r["text"] for r in s.export("prompts")] == ["from the CLI"]
