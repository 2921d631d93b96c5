"""CreateComparisonTasks retried after its answer was lost creates nothing twice (issue 11, item 12): the
store keeps each request id's first result, also across a restart, and the client always sends one."""

from __future__ import annotations

from chatrl.clients.lib import FeedbackClient
from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.proto.chatrl.v1 import feedback_pb2


def test_a_repeated_request_id_returns_the_first_tasks_and_samples_once(tmp_path):
    calls = []

    def sampler(texts, k):
        calls.append(list(texts))
        return [[f"{t} {i}" for i in range(k)] for t in texts], [[True] * k for _ in texts], 3

    store = FeedbackStore(tmp_path / "fb.db")
    first = store.create_comparison_tasks(["a", "b"], [], 2, sampler, request_id="req-1")
    again = store.create_comparison_tasks(["a", "b"], [], 2, sampler, request_id="req-1")
    other = store.create_comparison_tasks(["a"], [], 2, sampler, request_id="req-2")
    assert again == first and len(first[0]) == 2 and other[0][0] not in first[0]
    assert len(calls) == 2  # the retry asked policy-inference for nothing
    store.close()
    store = FeedbackStore(tmp_path / "fb.db")  # the key is in the database, not in memory
    assert store.create_comparison_tasks(["a", "b"], [], 2, sampler, request_id="req-1") == first
    assert store.stats()["tasks"] == 3
    store.close()


def test_the_client_fills_in_a_request_id(monkeypatch):
    sent = []
    c = FeedbackClient("127.0.0.1:1")
    monkeypatch.setattr(c, "_call", lambda fn, req, timeout=None: sent.append(req) or
                        feedback_pb2.CreateComparisonTasksResponse())
    c.create_comparison_tasks(["a"], 2)
    c.create_comparison_tasks(["a"], 2)
    c.close()
    assert all(len(r.request_id) == 32 for r in sent) and sent[0].request_id != sent[1].request_id
