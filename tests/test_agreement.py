"""Agreement between labelers: tiers from rankings with ties, pairwise agreement and Kendall's tau-b by hand,
the aggregates per labeler and overall, and the figure through the store, GetStats and /metrics."""

from __future__ import annotations

import math
import urllib.request

import pytest
from kit import env_var

from chatrl.clients.lib import FeedbackClient
from chatrl.services.core.agreement import compare, summarize, tiers
from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.feedback.server import FeedbackConfig, build
from chatrl.services.runtime.server import ServerConfig


def test_tiers_put_tied_responses_on_one_level():
    # best first: response 2, tied with response 0, then response 1
    assert tiers([2, 0, 1], [True, False]) == [0, 1, 0]
    assert tiers([1, 0, 2]) == [1, 0, 2]


def test_identical_and_reversed_rankings():
    assert compare([0, 1, 2], [0, 1, 2]) == (1.0, 1.0)
    assert compare([0, 1, 2], [2, 1, 0]) == (0.0, -1.0)


def test_a_tie_against_an_order():
    # A ties responses 0 and 1 above 2; B orders 0 > 1 > 2. Pairs (0,1): tie vs order (disagree, neither
    # concordant nor discordant); (0,2) and (1,2): same order (concordant). Agreement 2/3;
    # tau-b = (C - D) / sqrt((n0 - tA)(n0 - tB)) = (2 - 0) / sqrt((3 - 1)(3 - 0)) = 2 / sqrt(6).
    agree, tau = compare([0, 0, 1], [0, 1, 2])
    assert agree == pytest.approx(2 / 3)
    assert tau == pytest.approx(2 / math.sqrt(6))


def test_a_tie_agrees_with_a_tie():
    # both tie 1 and 2 below 0: every pair the same, tau-b = 2 / sqrt(2 * 2) = 1
    assert compare([0, 1, 1], [0, 1, 1]) == (1.0, 1.0)


def test_tau_is_undefined_when_a_labeler_ties_everything():
    agree, tau = compare([0, 0, 0], [0, 1, 2])
    assert agree == 0.0 and tau is None


def test_summary_per_labeler_and_overall():
    # one task, three labelers: a and b agree fully, c reverses both
    rows = [("t1", "a", [0, 1, 2]), ("t1", "b", [0, 1, 2]), ("t1", "c", [2, 1, 0]),
            ("t2", "a", [0, 1]), ("t3", "b", [1, 0])]  # tasks with one ranking compare nothing
    overall, per = summarize(rows)
    assert overall.as_dict() == {"compared": 3, "pairwise": pytest.approx(1 / 3), "kendall_tau": pytest.approx(-1 / 3)}
    assert per["a"].as_dict() == {"compared": 2, "pairwise": 0.5, "kendall_tau": 0.0}
    assert per["c"].as_dict() == {"compared": 2, "pairwise": 0.0, "kendall_tau": -1.0}


def _two_labelers_on_one_task(store: FeedbackStore) -> str:
    """One task ranked by alice and then bob (the store gives every task to two labelers)."""
    (tid,) = store.create_tasks([{"prompt": "p", "responses": ["x", "y", "z"]}], lease_to="alice")
    store.submit_ranking("s-a", tid, "alice", [0, 1, 2])
    assert store.next_task("bob")[0]["task_id"] == tid
    store.submit_ranking("s-b", tid, "bob", [1, 0, 2], tied_with_next=[True, False])
    return tid


def test_an_overlapping_task_stays_open_until_enough_labelers_ranked_it(tmp_path):
    with FeedbackStore(tmp_path / "f.db", overlap_fraction=1.0, overlap_labelers=2) as store:
        (tid,) = store.create_tasks([{"prompt": "p", "responses": ["x", "y"]}])
        assert store.next_task("alice")[0]["task_id"] == tid
        store.submit_ranking("s-a", tid, "alice", [0, 1])
        assert store.stats()["open_tasks"] == 1
        assert store.next_task("alice")[0] is None  # never their own task twice
        assert store.next_task("bob")[0]["task_id"] == tid
        store.submit_ranking("s-b", tid, "bob", [1, 0])
        assert store.stats()["open_tasks"] == 0
        assert store.agreement()["overall"] == {"compared": 1, "pairwise": 0.0, "kendall_tau": -1.0}


def test_no_overlap_by_default(tmp_path):
    with FeedbackStore(tmp_path / "f.db") as store:
        (tid,) = store.create_tasks([{"prompt": "p", "responses": ["x", "y"]}], lease_to="alice")
        store.submit_ranking("s-a", tid, "alice", [0, 1])
        assert store.stats()["open_tasks"] == 0
        assert store.next_task("bob") == (None, 0)


def test_agreement_in_get_stats_and_metrics(tmp_path):
    # alice [0,1,2]; bob ties 1 and 0 above 2 → tiers [0,0,1] vs [0,1,2]: agreement 2/3, tau 2/sqrt(6)
    with env_var("CHATRL_AGREEMENT_TEST_TOKEN", "tok"):
        srv, svc = build(ServerConfig(port=0, metrics_port=0, auth_token_env="CHATRL_AGREEMENT_TEST_TOKEN",
                                      grace_seconds=1),
                         FeedbackConfig(db=str(tmp_path / "f.db"), policy_address="127.0.0.1:1",
                                        overlap_fraction=1.0))
    try:
        _two_labelers_on_one_task(svc.store)
        with FeedbackClient(srv.address, token="tok") as c:
            st = c.stats()
        assert st.agreement.compared == 1
        assert st.agreement.pairwise == pytest.approx(2 / 3)
        assert st.agreement.kendall_tau == pytest.approx(2 / math.sqrt(6))
        assert [la.labeler_id for la in st.labelers] == ["alice", "bob"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        val = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
               if ln and not ln.startswith("#")}
        assert val['chatrl_feedback_agreement_ratio{scope="overall"}'] == pytest.approx(2 / 3)
        assert val['chatrl_feedback_kendall_tau{scope="bob"}'] == pytest.approx(2 / math.sqrt(6))
        assert val['chatrl_feedback_agreement_comparisons{scope="overall"}'] == 1
    finally:
        srv.stop(0)
        svc.close()
