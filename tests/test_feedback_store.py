"""The feedback service's label store (no gRPC): happy paths, every error path, idempotency, leases,
durability under kill -9, and export rows the trainer's loaders accept."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from chatrl.services.core import formats
from chatrl.services.core.feedback_store import SCHEMA_VERSION, FeedbackStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def store(tmp_path, clock):
    s = FeedbackStore(tmp_path / "fb.db", lease_seconds=60, clock=clock)
    yield s
    s.close()


def _task(store: FeedbackStore, prompt="How was the film?", k=3, version=7, lease_to: str | None = None) -> str:
    """A task; ``lease_to``: leased to that labeler at once (a ranking needs the lease)."""
    resp = [f"answer {i} to {prompt}" for i in range(k)]
    return store.create_tasks([{"prompt": prompt, "responses": resp, "finished": [i % 2 == 0 for i in range(k)]}],
                              policy_model_version=version, lease_to=lease_to)[0]


def _err(kind: str, field: str):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            assert et is StoreError, f"expected StoreError, got {et}"
            assert e.kind == kind, (e.kind, str(e))
            assert str(e).startswith(field), str(e)
            self.err = e
            return True
    return _Ctx()


# -- happy paths ---------------------------------------------------------------------------------

def test_schema_and_pragmas(store, tmp_path):
    assert store.schema_version() == SCHEMA_VERSION
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    FeedbackStore(tmp_path / "fb.db").close()  # reopening an existing DB is fine


def test_newer_schema_refused(tmp_path):
    FeedbackStore(tmp_path / "x.db").close()
    db = sqlite3.connect(tmp_path / "x.db")
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        FeedbackStore(tmp_path / "x.db")


def test_prompts_dedup(store):
    ids, added = store.add_prompts([("a?", "chatterbot"), ("b?", ""), ("a?", "other")])
    assert added == 2 and ids[0] == ids[2] != ids[1]
    ids2, added2 = store.add_prompts(["b?", "c?"])
    assert added2 == 1 and ids2[0] == ids[1]
    assert store.get_prompt(ids[0])["source"] == "chatterbot"
    assert store.stats()["prompts"] == 3


def test_rank_flow_and_stats(store):
    t1, t2 = _task(store, "p1", k=4), _task(store, "p2", k=2)
    st = store.stats()
    assert st == {"prompts": 2, "open_tasks": 2, "tasks": 2, "rankings": 0, "demonstrations": 0,
                  "rankings_sequence": 0, "skips": 0, "leased_tasks": 0, "active_labelers": 0}
    task, remaining = store.next_task("alice")
    assert task["task_id"] == t1 and remaining == 1 and task["prompt"] == "p1"
    assert len(task["responses"]) == 4 and task["policy_model_version"] == 7
    assert task["lease_expires_us"] == task["created_us"] + 60_000_000
    # asking again returns the same leased task (page reload), bob gets the other one
    assert store.next_task("alice")[0]["task_id"] == t1
    bob_task, bob_left = store.next_task("bob")
    assert bob_task["task_id"] == t2 and bob_left == 0
    rid, dup, pairs = store.submit_ranking("s1", t1, "alice", [2, 0, 3, 1])
    assert not dup and pairs == 6 and rid
    assert store.stats()["open_tasks"] == 1 and store.stats()["rankings"] == 1
    # t2 is leased to bob, t1 is done: nothing for alice
    assert store.next_task("alice") == (None, 0)
    assert store.submit_ranking("s2", t2, "bob", [1, 0])[2] == 1
    assert store.stats()["open_tasks"] == 0


def test_leased_tasks_and_active_labelers(store, clock):
    t1, _ = _task(store, "p1"), _task(store, "p2")
    store.next_task("alice")
    store.next_task("bob")
    assert (store.stats()["leased_tasks"], store.stats()["active_labelers"]) == (2, 2)
    store.submit_ranking("s1", t1, "alice", [0, 1, 2])  # alice is active (a ranking), bob holds a lease
    assert (store.stats()["leased_tasks"], store.stats()["active_labelers"]) == (1, 2)
    clock.t += 61  # bob's lease ran out; alice's ranking is recent
    assert (store.stats()["leased_tasks"], store.stats()["active_labelers"]) == (0, 1)
    clock.t += 900  # nobody has done anything for 15 minutes: one open task, nobody on it
    st = store.stats()
    assert (st["open_tasks"], st["leased_tasks"], st["active_labelers"]) == (1, 0, 0)


def test_lease_expiry_returns_task_to_pool(store, clock):
    t = _task(store)
    assert store.next_task("alice")[0]["task_id"] == t
    assert store.next_task("bob") == (None, 0)
    clock.t += 59.9
    assert store.next_task("bob") == (None, 0)
    clock.t += 0.1  # lease over
    task, _ = store.next_task("bob")
    assert task["task_id"] == t and task["lease_labeler"] == "bob"
    assert store.next_task("alice") == (None, 0)  # now bob holds it


def test_only_the_lease_holder_ranks_or_skips(store, clock):
    t = _task(store)
    with _err("precondition", "task_id") as c:  # never handed out: nobody holds it
        store.submit_ranking("s0", t, "alice", [0, 1, 2])
    assert "not leased to anyone" in str(c.err)
    with _err("precondition", "task_id"):
        store.skip_task("k0", t, "alice", "no lease")
    assert store.next_task("alice")[0]["task_id"] == t
    with _err("precondition", "task_id") as c:  # bob was not given it
        store.submit_ranking("s1", t, "bob", [0, 1, 2])
    assert "leased to another labeler" in str(c.err)
    with _err("precondition", "task_id"):
        store.skip_task("k1", t, "bob", "not mine")
    clock.t += 61  # alice's lease ran out, but nobody else was given the task: her ranking still counts
    assert store.submit_ranking("s2", t, "alice", [2, 1, 0])[1] is False
    assert store.submit_ranking("s2", t, "alice", [2, 1, 0])[1] is True  # a retry after the lease cleared
    assert store.stats()["rankings"] == 1 and store.stats()["skips"] == 0


def test_an_expired_lease_handed_to_another_labeler_is_theirs(store, clock):
    t = _task(store)
    assert store.next_task("alice")[0]["task_id"] == t
    clock.t += 61
    assert store.next_task("bob")[0]["task_id"] == t
    with _err("precondition", "task_id"):
        store.submit_ranking("late", t, "alice", [0, 1, 2])
    store.submit_ranking("b", t, "bob", [1, 0, 2])
    assert [r["labeler_id"] for r in store.export("rankings")] == ["bob"]

def test_never_the_same_task_twice_with_several_rankings(tmp_path, clock):
    s = FeedbackStore(tmp_path / "m.db", rankings_per_task=2, clock=clock)
    t = _task(s)
    assert s.next_task("alice")[0]["task_id"] == t
    s.submit_ranking("a1", t, "alice", [0, 1, 2])
    assert s.stats()["open_tasks"] == 1
    assert s.next_task("alice") == (None, 0)  # alice already ranked it
    assert s.next_task("bob")[0]["task_id"] == t
    s.submit_ranking("b1", t, "bob", [2, 1, 0])
    assert s.stats()["open_tasks"] == 0
    s.close()


def test_create_comparison_tasks_with_sampler(store):
    (existing,), _ = store.add_prompts(["old prompt"])
    calls = []

    def sampler(texts, k):
        calls.append((list(texts), k))
        return [[f"{t} #{j}" for j in range(k)] for t in texts], [[True, False, True]] * len(texts), 12

    ids, version = store.create_comparison_tasks(["new prompt"], [existing], 3, sampler, source="test")
    assert version == 12 and len(ids) == 2
    assert calls == [(["new prompt", "old prompt"], 3)]
    t0, t1 = store.get_task(ids[0]), store.get_task(ids[1])
    assert t0["prompt"] == "new prompt" and t0["responses"][2] == "new prompt #2"
    assert t1["prompt_id"] == existing and t1["finished"] == [True, False, True]


def test_demonstrations(store):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}]
    did, dup = store.submit_demonstration("d1", "alice", msgs)
    assert not dup and store.stats()["demonstrations"] == 1
    assert store.submit_demonstration("d1", "alice", msgs) == (did, True)


# -- errors --------------------------------------------------------------------------------------

def test_ranking_errors(store):
    t = _task(store, k=3, lease_to="al")
    with _err("invalid", "ranking") as c:
        store.submit_ranking("x", t, "al", [0, 0, 1])
    assert "duplicates [0]" in str(c.err) and "missing [2]" in str(c.err)
    with _err("invalid", "ranking") as c:
        store.submit_ranking("x", t, "al", [0, 1])
    assert "missing [2]" in str(c.err)
    with _err("invalid", "ranking") as c:
        store.submit_ranking("x", t, "al", [0, 1, 5])
    assert "out of range [5]" in str(c.err)
    with _err("invalid", "ranking"):
        store.submit_ranking("x", t, "al", [0, 1, True])
    with _err("not_found", "task_id"):
        store.submit_ranking("x", "t_nope", "al", [0, 1, 2])
    with _err("invalid", "submission_id"):
        store.submit_ranking("", t, "al", [0, 1, 2])
    with _err("invalid", "labeler_id"):
        store.submit_ranking("x", t, " ", [0, 1, 2])
    with _err("invalid", "task_id"):
        store.submit_ranking("x", "", "al", [0, 1, 2])
    store.submit_ranking("x", t, "al", [0, 1, 2])
    with _err("conflict", "task_id") as c:  # same labeler, new submission id
        store.submit_ranking("y", t, "al", [2, 1, 0])
    assert "already ranked" in str(c.err)
    assert store.stats()["rankings"] == 1


def test_idempotent_ranking(store):
    t = _task(store, lease_to="al")
    first = store.submit_ranking("sub-1", t, "al", [1, 0, 2])
    assert store.submit_ranking("sub-1", t, "al", [1, 0, 2]) == (first[0], True, 3)
    with _err("conflict", "submission_id"):
        store.submit_ranking("sub-1", t, "al", [2, 0, 1])
    with _err("conflict", "submission_id"):
        store.submit_ranking("sub-1", t, "bob", [1, 0, 2])
    with _err("conflict", "submission_id"):  # shared namespace with demonstrations
        store.submit_demonstration("sub-1", "al", [{"role": "assistant", "content": "x"}])
    assert store.stats()["rankings"] == 1 and store.stats()["demonstrations"] == 0


def test_demonstration_errors(store):
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with _err("invalid", "messages"):
        store.submit_demonstration("d", "al", [])
    with _err("invalid", "messages[1].role") as c:
        store.submit_demonstration("d", "al", ok[:1] + [{"role": "user", "content": "again"}])
    assert "last message" in str(c.err)
    with _err("invalid", "messages[0].role"):
        store.submit_demonstration("d", "al", [{"role": "robot", "content": "x"}] + ok)
    with _err("invalid", "messages[1].content"):
        store.submit_demonstration("d", "al", [ok[0], {"role": "assistant", "content": "  "}])
    with _err("invalid", "labeler_id"):
        store.submit_demonstration("d", "", ok)
    store.submit_demonstration("d", "al", ok)
    with _err("conflict", "submission_id"):
        store.submit_demonstration("d", "al", ok[:1] + [{"role": "assistant", "content": "other"}])


def test_task_and_prompt_errors(store):
    with _err("invalid", "prompts[1]"):
        store.add_prompts(["fine", "   "])
    with _err("invalid", "prompts[0].text"):
        store.add_prompts([("", "src")])
    with _err("invalid", "prompts[0]") as c:
        store.add_prompts(["x" * 30_000])
    assert "too long" in str(c.err)
    with _err("invalid", "tasks[0].responses") as c:
        store.create_tasks([{"prompt": "p", "responses": ["only one"]}])
    assert "K must be >= 2" in str(c.err)
    with _err("invalid", "tasks[0].prompt"):
        store.create_tasks([{"prompt": "", "responses": ["a", "b"]}])
    with _err("invalid", "tasks[0].finished"):
        store.create_tasks([{"prompt": "p", "responses": ["a", "b"], "finished": [True]}])
    with _err("not_found", "tasks[0].prompt_id"):
        store.create_tasks([{"prompt_id": "p_nope", "responses": ["a", "b"]}])
    with _err("not_found", "task_id"):
        store.get_task("t_nope")
    with _err("not_found", "prompt_id"):
        store.get_prompt("p_nope")
    with _err("invalid", "labeler_id"):
        store.next_task("")
    called = []

    def sampler(texts, k):
        called.append(1)
        return [["a"] * k for _ in texts], [[True] * k for _ in texts], 1

    with _err("invalid", "k"):
        store.create_comparison_tasks(["p"], [], 1, sampler)
    with _err("invalid", "prompts"):
        store.create_comparison_tasks([], [], 4, sampler)
    with _err("invalid", "prompts[0]"):
        store.create_comparison_tasks([""], [], 4, sampler)
    with _err("not_found", "prompt_ids[0]"):
        store.create_comparison_tasks([], ["p_nope"], 4, sampler)
    assert not called  # validation happens before the policy is asked
    with _err("invalid", "samples[0].responses"):
        store.create_comparison_tasks(["p"], [], 4, lambda t, k: ([["a"]], [[True]], 1))
    assert store.stats() == {"prompts": 0, "open_tasks": 0, "tasks": 0, "rankings": 0, "demonstrations": 0,
                             "rankings_sequence": 0, "skips": 0, "leased_tasks": 0, "active_labelers": 0}


def test_export_errors(store):
    with _err("invalid", "kind"):
        store.export("triples")
    with _err("invalid", "limit"):
        store.export("rankings", limit=-1)


# -- export --------------------------------------------------------------------------------------

def test_export_rows_load_with_trainer_formats(store, clock, tmp_path):
    store.add_prompts([("Tell me a joke.", "chatterbot")])
    ts = [_task(store, f"prompt {i}", k=3, lease_to="al") for i in range(3)]
    for i, t in enumerate(ts):
        clock.t += 1
        store.submit_ranking(f"s{i}", t, "al", [(i + j) % 3 for j in range(3)])
    store.submit_demonstration("d0", "al", [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello."}])
    for kind, loader in (("rankings", formats.load_rankings), ("demonstrations", formats.load_sft),
                         ("prompts", formats.load_prompts)):
        rows = list(store.export(kind))
        path = tmp_path / f"{kind}.jsonl"
        formats.write_jsonl(path, rows)
        loaded = loader(path)
        assert len(loaded) == len(rows) > 0
    r = formats.load_rankings(tmp_path / "rankings.jsonl")
    assert r[1].prompt == "prompt 1" and r[1].ranking == [1, 2, 0] and r[1].finished == [True, False, True]
    row = next(store.export("rankings"))
    assert set(row) >= {"ranking_id", "task_id", "prompt_id", "prompt", "responses", "ranking", "labeler_id",
                        "submission_id", "policy_model_version", "created_at", "finished"}
    assert row["created_at"].endswith("Z") and row["policy_model_version"] == 7
    assert formats.load_sft(tmp_path / "demonstrations.jsonl")[0][-1]["content"] == "Hello."
    p = next(store.export("prompts"))
    assert p["text"] == p["prompt"] == "Tell me a joke." and p["source"] == "chatterbot"


def test_export_pairs_skip_tied_pairs(store):
    t = _task(store, "Which is best?", k=4, lease_to="al")
    # ranking 3 > (1 = 0) > 2: C(4,2) = 6 pairs less the tied one
    store.submit_ranking("s", t, "al", [3, 1, 0, 2], tied_with_next=[False, True, False])
    got = {(p["chosen"].split()[1], p["rejected"].split()[1]) for p in store.export("pairs")}  # "answer i to …"
    assert got == {("3", "1"), ("3", "0"), ("3", "2"), ("1", "2"), ("0", "2")}
    assert store.sequence("pairs") == store.sequence("rankings") > 0
    assert list(store.export("pairs", after_sequence=store.sequence("pairs"))) == []


def test_export_since_and_limit(store, clock):
    t0 = clock.t
    ts = [_task(store, f"q{i}", k=2, lease_to="al") for i in range(7)]
    for i, t in enumerate(ts):
        clock.t = t0 + 10 * (i + 1)
        store.submit_ranking(f"s{i}", t, "al", [0, 1])
    allr = list(store.export("rankings"))
    assert [r["submission_id"] for r in allr] == [f"s{i}" for i in range(7)]  # oldest first
    assert [r["submission_id"] for r in store.export("rankings", limit=3)] == ["s0", "s1", "s2"]
    since = datetime.fromtimestamp(t0 + 30, tz=timezone.utc)  # inclusive
    assert [r["submission_id"] for r in store.export("rankings", since=since)] == [f"s{i}" for i in range(2, 7)]
    assert [r["submission_id"] for r in store.export("rankings", since=t0 + 30, limit=2)] == ["s2", "s3"]
    assert list(store.export("rankings", since=t0 + 1000)) == []


def test_export_pages_past_page_size(store, monkeypatch):
    import chatrl.services.core.feedback_store as st
    monkeypatch.setattr(st, "_PAGE", 3)
    store.add_prompts([f"p{i}" for i in range(10)])  # same timestamp: ties broken by insertion order
    assert [r["text"] for r in store.export("prompts")] == [f"p{i}" for i in range(10)]
    assert len(list(store.export("prompts", limit=7))) == 7


def test_export_after_sequence_reads_only_what_came_later(store, clock):
    # the sequence is the commit order, whatever the clock says: a reader holding a cursor never misses
    # a ranking committed after it, even one stamped earlier (a clock stepped back)
    t1, t2, t3 = (_task(store, q, k=2, lease_to="al") for q in "abc")
    assert store.sequence("rankings") == 0
    store.submit_ranking("s1", t1, "al", [0, 1])
    cursor = store.sequence("rankings")
    assert [r["submission_id"] for r in store.export("rankings", after_sequence=cursor)] == []
    clock.t -= 3600
    store.submit_ranking("s2", t2, "al", [1, 0])
    store.submit_ranking("s3", t3, "al", [0, 1])
    rows = list(store.export("rankings", after_sequence=cursor))
    assert [r["submission_id"] for r in rows] == ["s2", "s3"]
    assert rows[0]["sequence"] > cursor and rows[1]["sequence"] > rows[0]["sequence"]
    assert rows[1]["sequence"] == store.sequence("rankings") == store.stats()["rankings_sequence"]
    assert list(store.export("rankings", after_sequence=rows[1]["sequence"])) == []
    with _err("invalid", "after_sequence"):
        store.export("rankings", after_sequence=-1)


def test_wait_for_new_wakes_on_a_submission_from_another_thread(store):
    t = _task(store, "a", k=2, lease_to="al")
    cursor = store.sequence("rankings")
    assert store.wait_for_new("rankings", cursor, timeout_s=0) is False  # nothing yet, no wait
    waiting = threading.Event()
    submitter = threading.Thread(target=lambda: (waiting.wait(), store.submit_ranking("s", t, "al", [1, 0])))
    submitter.start()
    # the submitter fires once the waiter checks stop() (it is then inside the wait)
    assert store.wait_for_new("rankings", cursor, timeout_s=30, stop=lambda: waiting.set() and False) is True
    submitter.join()
    assert [r["submission_id"] for r in store.export("rankings", after_sequence=cursor)] == ["s"]


# -- concurrency & durability --------------------------------------------------------------------

def test_concurrent_submissions_from_threads(store):
    ts = [_task(store, f"c{i}", k=2, lease_to="al") for i in range(20)]
    results, errors = [], []

    def worker(w):
        try:
            for i, t in enumerate(ts):  # every thread submits every id: exactly one wins each
                results.append(store.submit_ranking(f"sub{i}", t, "al", [0, 1]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sum(not dup for _, dup, _ in results) == 20 and len(results) == 80
    assert store.stats()["rankings"] == 20


_CHILD = """
import sys
from chatrl.services.core.feedback_store import FeedbackStore
s = FeedbackStore(sys.argv[1])
rid, dup, _ = s.submit_ranking("durable-1", sys.argv[2], "alice", [1, 0, 2])
d, _ = s.submit_demonstration("durable-2", "alice", [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}])
print(rid, d, flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_label_survives_kill_9(tmp_path):
    db = tmp_path / "dur.db"
    with FeedbackStore(db) as s:
        t = _task(s, lease_to="alice")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), t], cwd=ROOT, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)  # right after the calls returned: no close, no checkpoint
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
        p.stdin.close()
    assert p.returncode == -signal.SIGKILL
    rid, did = line.split()
    with FeedbackStore(db) as s:
        rows = list(s.export("rankings"))
        assert [(r["ranking_id"], r["ranking"]) for r in rows] == [(rid, [1, 0, 2])]
        assert [r["demonstration_id"] for r in s.export("demonstrations")] == [did]
        assert s.stats()["open_tasks"] == 0
        assert s.submit_ranking("durable-1", t, "alice", [1, 0, 2]) == (rid, True, 3)
    assert json.loads(json.dumps(rows[0]))  # JSON-serialisable as exported
