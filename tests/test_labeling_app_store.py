"""What the labeling app stores: ties, ratings and flags with a ranking, skips, conversations as prompts,
a labeler's own stats, and the schema migration of a version-1 database."""

from __future__ import annotations

import sqlite3

import pytest

from chatrl.services.core import feedback_store as fs
from chatrl.services.core.feedback_store import FeedbackStore, StoreError


@pytest.fixture()
def store(tmp_path):
    with FeedbackStore(tmp_path / "f.db") as s:
        yield s


def _task(store, k=3, lease_to: str | None = "alice"):
    return store.create_tasks([{"prompt": "p", "responses": [f"r{i}" for i in range(k)]}], lease_to=lease_to)[0]


def test_ties_ratings_and_flags_are_stored_and_exported(store):
    tid = _task(store, 4)
    # 4 responses, two tied pairs: C(4,2) = 6 less 2 tied pairs
    judged = [{"rating": 7, "flags": []}, {"rating": 0, "flags": ["unfinished", "harmful"]},
              {"rating": 3, "flags": []}, {"rating": 1, "flags": ["made_up_facts"]}]
    rid, dup, pairs = store.submit_ranking("s1", tid, "alice", [0, 2, 1, 3], [True, False, True], judged)
    assert (dup, pairs) == (False, 4)
    assert store.submit_ranking("s1", tid, "alice", [0, 2, 1, 3], [True, False, True], judged) == (rid, True, 4)
    (row,) = store.export("rankings")
    assert row["tied_with_next"] == [True, False, True]
    assert row["ratings"] == [7, 0, 3, 1]
    assert row["flags"] == [[], ["harmful", "unfinished"], [], ["made_up_facts"]]  # in FLAGS order
    with pytest.raises(StoreError, match="submission_id"):  # same id, different ties
        store.submit_ranking("s1", tid, "alice", [0, 2, 1, 3], None, judged)


@pytest.mark.parametrize("ties, assessments, field", [
    ([True], None, "tied_with_next"),
    (None, [{"rating": 8, "flags": []}] * 3, r"assessments\[0\].rating"),
    (None, [{"rating": 1, "flags": ["rude"]}] * 3, r"assessments\[0\].flags"),
    (None, [{"rating": 1, "flags": ["harmful", "harmful"]}] * 3, r"assessments\[0\].flags"),
    (None, [{"rating": 1}] * 2, "assessments"),
])
def test_bad_ties_or_assessments_name_the_field(store, ties, assessments, field):
    tid = _task(store)
    with pytest.raises(StoreError, match=f"^{field}"):
        store.submit_ranking("s", tid, "alice", [0, 1, 2], ties, assessments)


def test_a_skipped_task_goes_to_the_others(store):
    tid = _task(store)
    assert store.next_task("alice")[0]["task_id"] == tid
    sid, dup = store.skip_task("k1", tid, "alice", "cannot judge")
    assert not dup and store.skip_task("k1", tid, "alice", "cannot judge") == (sid, True)
    assert store.next_task("alice")[0] is None
    assert store.next_task("bob")[0]["task_id"] == tid  # alice's lease ended with the skip
    with pytest.raises(StoreError, match="^task_id"):
        store.skip_task("k2", tid, "alice", "again")
    with pytest.raises(StoreError, match="^reason"):
        store.skip_task("k3", tid, "carol", " ")
    assert store.stats()["skips"] == 1
    assert store.labeler_stats("alice") == {"labeler_id": "alice", "rankings": 0, "skips": 1, "demonstrations": 0,
                                            "agreement": {"compared": 0, "pairwise": 0.0, "kendall_tau": 0.0}}


def test_a_conversation_is_the_prompt_of_its_task(store):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}]
    seen = []

    def sampler(prompts, k):
        seen.extend(prompts)
        return [["a", "b"] for _ in prompts], [[True, True] for _ in prompts], 5

    (t1, t2), version = store.create_comparison_tasks(["plain"], [], 2, sampler, conversations=[chat])
    assert seen == ["plain", chat] and version == 5
    task = store.get_task(t2)
    assert task["messages"] == chat
    assert task["prompt"] == "User: hi\n\nAssistant: hello\n\nUser: more"
    assert store.get_task(t1)["messages"] == [{"role": "user", "content": "plain"}]
    with pytest.raises(StoreError, match=r"^conversations\[0\]\[0\].role"):
        store.create_comparison_tasks([], [], 2, sampler, conversations=[[{"role": "assistant", "content": "x"}]])


def test_a_version_1_database_is_migrated(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(fs._SCHEMA_V1 + "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES ('schema_version', '1');"
                     "INSERT INTO prompts VALUES ('p_1', 'old prompt', '', 1);"
                     "INSERT INTO tasks(id, prompt_id, k, responses, finished, created_us) "
                     "VALUES ('t_1', 'p_1', 2, '[\"a\", \"b\"]', '[true, true]', 1);"
                     "INSERT INTO rankings VALUES ('r_1', 't_1', 'alice', '[1, 0]', 's_1', 2);"
                     "UPDATE tasks SET n_rankings = 1;")
    db.close()
    with FeedbackStore(path) as store:
        assert store.schema_version() == 2
        (row,) = store.export("rankings")
        assert row["messages"] == [{"role": "user", "content": "old prompt"}]
        assert (row["tied_with_next"], row["ratings"], row["flags"]) == ([False], [0, 0], [[], []])
        assert store.stats()["open_tasks"] == 0
        tid = _task(store)
        store.skip_task("k", tid, "alice", "why not")  # the new table exists
