"""The label path (services/trainer/labels.py) over the feedback service: a round reads only the labels
stored after its cursor, and with nobody simulating (``pipeline.labelers: 0``) it waits until a person
has ranked every task."""

from __future__ import annotations

import threading

import pytest

from chatrl.clients.lib import FeedbackClient
from chatrl.services.feedback.server import FeedbackConfig, build
from chatrl.services.runtime.server import ServerConfig
from chatrl.services.trainer import labels
from chatrl.services.trainer.stages.common import Reporter


@pytest.fixture()
def feedback(tmp_path):
    """A real feedback service on loopback (no auth; CreateComparisonTasks is not used: tasks are made in
    its store, as a policy would have sampled them) and a client of it."""
    srv, svc = build(ServerConfig(port=0, auth_token_env="", grace_seconds=1),
                     FeedbackConfig(db=str(tmp_path / "feedback.db"), policy_address="127.0.0.1:1"))
    client = FeedbackClient(srv.address, timeout=60.0)
    yield svc.store, client
    client.close()
    srv.stop(0)
    svc.close()


def _task(store, prompt: str, lease_to: str | None = None) -> str:
    return store.create_tasks([{"prompt": prompt, "responses": ["fine.", "It was warm and funny."]}],
                              lease_to=lease_to)[0]


class Spy:
    """A LabelStore that passes every call through and tells the test when the wait has started."""

    def __init__(self, inner: labels.LabelStore) -> None:
        self.inner = inner
        self.waiting = threading.Event()

    def rankings_after(self, after_sequence: int, wait_s: float) -> list[dict]:
        self.waiting.set()
        return self.inner.rankings_after(after_sequence, wait_s)


def test_wait_returns_once_a_person_ranks_every_task_through_the_service(feedback):
    store, client = feedback
    old = _task(store, "An older task, ranked before this round.", lease_to="carol")
    client.submit_ranking("old", old, "carol", [0, 1])
    service = labels.ServiceLabels(client)
    cursor = service.cursor()  # what the round sees: nothing before this
    assert cursor == store.sequence("rankings") > 0
    t1, t2 = _task(store, "How was the film?"), _task(store, "Did you like the cast?")
    spy = Spy(service)

    def person() -> None:  # ranks through NextTask / SubmitRanking once the round is waiting
        spy.waiting.wait()
        for _ in range(2):
            task = client.next_task("alice").task
            client.submit_ranking(f"alice/{task.task_id}", task.task_id, "alice", [1, 0])

    th = threading.Thread(target=person)
    th.start()
    rows = labels.wait_for_rankings(spy, {t1, t2}, cursor, Reporter(quiet=True), wait_s=30.0)
    th.join()
    assert sorted(r["task_id"] for r in rows) == sorted([t1, t2])
    assert {(r["labeler_id"], tuple(r["ranking"])) for r in rows} == {("alice", (1, 0))}
    assert all(r["sequence"] > cursor for r in rows)


def test_service_export_follows_the_cursor(feedback):
    store, client = feedback
    tasks = [_task(store, f"prompt {i}", lease_to="alice") for i in range(3)]
    service = labels.ServiceLabels(client)
    assert service.cursor() == 0 and service.rankings_after(0, 0) == []
    client.submit_ranking("a", tasks[0], "alice", [0, 1])
    first = service.rankings_after(0, 0)
    assert [r["submission_id"] for r in first] == ["a"]
    client.submit_ranking("b", tasks[1], "alice", [1, 0])
    client.submit_ranking("c", tasks[2], "alice", [0, 1])
    assert [r["submission_id"] for r in service.rankings_after(first[-1]["sequence"], 0)] == ["b", "c"]


def test_label_to_policy_latency_is_measured_at_the_rounds_first_push(tmp_path):
    from chatrl.services.trainer.pipeline import LabelLatencySink, labelled_at

    snap = tmp_path / "rankings_r0.jsonl"
    snap.write_text('{"created_at": "2026-01-01T00:00:00Z", "prompt": "two\u2028lines"}\n'
                    '{"created_at": "2026-01-01T00:01:40.000000Z"}\n{"prompt": "a user file without stamps"}\n',
                    encoding="utf-8")
    t0 = 1767225600.0  # 2026-01-01T00:00:00Z
    assert labelled_at(snap) == [t0, t0 + 100]
    assert labelled_at(tmp_path / "missing.jsonl") == []

    class Sink:
        metadata = {"round": "0"}
        pushes: list[int] = []

        def push(self, state, version):
            self.pushes.append(version)

    class Rep(Reporter):
        def metrics(self, stage, step, total, values):
            self.history.append({"stage": stage, **values})

    rep, now = Rep(quiet=True), [t0 + 400]
    got = []
    sink = LabelLatencySink(Sink(), labelled_at(snap), rep, "ppo_r0", clock=lambda: now[0], on_measured=got.append)
    assert sink.metadata == {"round": "0"}
    sink.push({}, 2)
    now[0] += 1000  # later pushes do not count: the first policy trained against the labels is version 2
    sink.push({}, 3)
    assert sink.sink.pushes == [2, 3]
    assert sink.latency == {"label_to_policy_s_median": 350.0, "label_to_policy_s_max": 400.0, "labels": 2.0}
    assert rep.history == [{"stage": "ppo_r0", **sink.latency}] and got == [sink.latency]


class MadeHere(Spy):
    """Tasks made in the service's store (as a policy would have sampled them); the rest through the service."""

    def __init__(self, inner: labels.LabelStore, store) -> None:
        super().__init__(inner)
        self.store = store

    def create_comparison_tasks(self, prompts, k, max_new_tokens, temperature, seed):
        return [_task(self.store, p) for p in prompts], 1

    def cursor(self) -> int:
        return self.inner.cursor()


def test_a_run_waiting_for_people_is_counted_until_they_rank(feedback, tmp_path):
    """What the trainer exports as chatrl_trainer_awaiting_rankings (ChatrlLabelingStalled needs it): a run
    with pipeline.labelers 0 counts its tasks while it waits, and nothing once people have ranked them."""
    from kit import wait_for

    from chatrl.services.trainer.runs import RunManager

    store, client = feedback
    spy = MadeHere(labels.ServiceLabels(client), store)
    prompts = ["How was the film?", "Did you like the cast?", "Tell me about the story."]

    def runner(stage, cfg, rep) -> None:
        labels.collect_rankings(cfg, spy, prompts, None, "r0", tmp_path / "r0.jsonl", rep)

    mgr = RunManager(tmp_path / "runs", runner)
    try:
        assert mgr.awaiting_rankings() == 0
        run = mgr.start("pipeline", "", {"pipeline.labelers": "0", "reward.num_prompts": "2", "reward.k": "2"})
        assert spy.waiting.wait(60)
        assert mgr.awaiting_rankings() == 2 and mgr.get(run.run_id).state == "RUNNING"
        for _ in range(2):
            task = client.next_task("alice").task
            client.submit_ranking(f"alice/{task.task_id}", task.task_id, "alice", [1, 0])
        wait_for(lambda: mgr.get(run.run_id).state in ("SUCCEEDED", "FAILED"), timeout=120, what="the run ends")
        assert mgr.get(run.run_id).error == "" and mgr.awaiting_rankings() == 0
    finally:
        mgr.close()
