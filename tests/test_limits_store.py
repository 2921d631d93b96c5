"""The label store bounds every input before it costs anything, and a failed write leaves it usable.

Issue 11 items 1 and 11: a huge ranking is refused by its size before any lookup (the old check built its
message with ``r.count(x)`` per element — quadratic — inside the write transaction); ids, sources and
demonstration text have caps; a database that is full answers ``exhausted`` and later writes work."""

from __future__ import annotations

import pytest

from chatrl.services.core.feedback_store import (
    MAX_DEMO_CHARS,
    MAX_ID_CHARS,
    MAX_SOURCE_CHARS,
    FeedbackStore,
    StoreError,
    check_ranking,
)


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(tmp_path / "fb.db", max_k=8)
    yield s
    s.close()


def _task(store: FeedbackStore, k: int = 3) -> str:
    return store.create_tasks([{"prompt": "p", "responses": [f"r{i}" for i in range(k)]}])[0]


def _refused(fn, kind: str, field: str) -> str:
    with pytest.raises(StoreError) as e:
        fn()
    assert (e.value.kind, e.value.field) == (kind, field), str(e.value)
    return str(e.value)


def test_a_huge_ranking_is_refused_by_its_size_before_the_task_is_looked_up(store):
    # 150k ids is what a 1 MB POST to /api/rankings holds; the task does not exist, and the size is what
    # the answer names: nothing was read from the database for it
    msg = _refused(lambda: store.submit_ranking("s", "t_nope", "al", list(range(150_000))), "invalid", "ranking")
    assert "at most 8 entries" in msg and "150000" in msg


def test_the_ranking_diagnostics_stay_exact_at_the_largest_k():
    r = [0, 0, 2, 9, 4, 5, 6, 6]  # K = 8: 1, 3 and 7 missing; 0 and 6 twice; 9 out of range
    with pytest.raises(StoreError) as e:
        check_ranking(r, 8)
    assert str(e.value) == ("ranking: must be a permutation of 0..7 (got 8 entries, duplicates [0, 6], "
                            "missing [1, 3, 7], out of range [9])")


def test_tasks_with_more_responses_than_max_k_are_refused(store):
    _refused(lambda: _task(store, k=9), "invalid", "tasks[0].responses")


@pytest.mark.parametrize("field", ["submission_id", "labeler_id", "task_id"])
def test_ids_are_capped(store, field):
    t = _task(store)
    args = {"submission_id": "s", "task_id": t, "labeler_id": "al"}
    args[field] = "x" * (MAX_ID_CHARS + 1)
    msg = _refused(lambda: store.submit_ranking(args["submission_id"], args["task_id"], args["labeler_id"],
                                                [0, 1, 2]), "invalid", field)
    assert f"at most {MAX_ID_CHARS}" in msg
    _refused(lambda: store.next_task("x" * (MAX_ID_CHARS + 1)), "invalid", "labeler_id")


def test_prompt_sources_are_capped(store):
    _refused(lambda: store.add_prompts([("fine", "s" * (MAX_SOURCE_CHARS + 1))]), "invalid", "prompts[0].source")


def test_demonstration_text_is_capped(store):
    per = MAX_DEMO_CHARS // 6 + 1  # six turns each under the per-message cap, together over the total
    msgs = [{"role": r, "content": "w" * per} for r in ("user", "assistant") * 3]
    msg = _refused(lambda: store.submit_demonstration("d", "al", msgs), "invalid", "messages")
    assert f"at most {MAX_DEMO_CHARS}" in msg
    assert store.stats()["demonstrations"] == 0


def test_a_full_database_answers_exhausted_and_later_writes_work(tmp_path):
    # max_db_mb caps the file (SQLite's max_page_count): the write that does not fit is refused as a full
    # disk would be, the transaction is rolled back, and the store keeps working
    s = FeedbackStore(tmp_path / "full.db", max_db_mb=0.25)
    try:
        big = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 19_000}]
        with pytest.raises(StoreError) as e:
            for i in range(100):  # 0.25 MiB holds about a dozen of these
                s.submit_demonstration(f"d{i}", "al", big)
        assert e.value.kind == "exhausted", str(e.value)
        stored = s.stats()["demonstrations"]
        assert 0 < stored < 100
        # a small write still fits in the pages left, and lands: nothing was left half-open
        s.submit_demonstration("small", "al", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
        assert s.stats()["demonstrations"] == stored + 1
    finally:
        s.close()
