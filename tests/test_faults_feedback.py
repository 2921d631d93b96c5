"""A run survives the death of the feedback service mid-labeling (issue 11, "Faults"): the launcher restarts
it, the label path (labels.ServiceLabels) waits for it and sends the failed call again — CreateComparisonTasks
under one request_id, NextTask (the labeler's own lease comes back), SubmitRanking (keyed by submission_id),
the wait re-read from its cursor — and every acknowledged label is still in the store (SQLite WAL on disk).
The trainer exports the restarts. Kills happen at fixed points of the label path, never after a sleep."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import grpc
import pytest
import yaml
from kit import MICRO, micro_data_overrides, wait_for
from prometheus_client import CollectorRegistry

from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.core.formats import load_prompts
from chatrl.services.core.gold import GoldLabeler
from chatrl.services.trainer import labels, pipeline
from chatrl.services.trainer.runs import RunManager, run_endpoints
from chatrl.services.trainer.server import ServiceHealthCollector

NUM_TASKS = 6


class KillingLabels:
    """A LabelStore passing every call through to ``inner``; it kills feedback (``kill``) right before the
    tasks are created, right after the first acknowledged ranking and right before the wait for rankings,
    and records every submission the service acknowledged."""

    def __init__(self, inner: labels.LabelStore, kill) -> None:
        self.inner, self.kill = inner, kill
        self.acknowledged: list[str] = []
        self.waited = False

    def create_comparison_tasks(self, *a):
        self.kill()
        return self.inner.create_comparison_tasks(*a)

    def next_task(self, labeler_id):
        return self.inner.next_task(labeler_id)

    def submit_ranking(self, submission_id, task_id, labeler_id, ranking):
        self.inner.submit_ranking(submission_id, task_id, labeler_id, ranking)
        self.acknowledged.append(submission_id)
        if len(self.acknowledged) == 1:
            self.kill()

    def cursor(self):
        return self.inner.cursor()

    def rankings_after(self, after_sequence, wait_s):
        if not self.waited:
            self.waited = True
            self.kill()
        return self.inner.rankings_after(after_sequence, wait_s)


def test_feedback_killed_three_times_mid_labeling_loses_no_label_and_the_trainer_counts_the_restarts(
        micro_run, tiny_data, tiny_gold, tmp_path):
    _, cks = micro_run
    out: dict = {}

    def runner(stage, cfg, rep) -> None:  # what a pipeline run does up to its first reward model's labels
        with run_endpoints(cfg, rep) as ep:
            cluster = rep.mgr.clusters[rep.run.run_id]
            svc = pipeline.connect(ep)
            try:
                pipeline.seed_models(svc, cks["sft"], rep)
                store = KillingLabels(labels.ServiceLabels(svc.feedback),
                                      lambda: os.kill(cluster.procs["feedback"].pid, signal.SIGKILL))
                out["rankings"] = labels.collect_rankings(
                    cfg, store, load_prompts(tiny_data["prompts"]), GoldLabeler.load(tiny_gold), "r0",
                    tmp_path / "rankings_r0.jsonl", rep)
                out["acknowledged"] = store.acknowledged
            finally:
                svc.close()

    mgr = RunManager(tmp_path / "runs", runner)
    registry = CollectorRegistry()
    registry.register(ServiceHealthCollector(mgr))
    try:
        config = yaml.safe_load(MICRO.read_text())
        config.pop("run_dir", None)
        over = dict(o.split("=", 1) for o in micro_data_overrides(tiny_data))
        run = mgr.start("pipeline", yaml.safe_dump(config), {**over, "reward.num_prompts": str(NUM_TASKS)})
        wait_for(lambda: mgr.get(run.run_id).state in ("SUCCEEDED", "FAILED"), timeout=1800,
                 what="the labeling run ends")
        assert mgr.get(run.run_id).error == ""
    finally:
        mgr.close()

    assert len(out["rankings"]) == NUM_TASKS
    assert mgr.clusters[run.run_id].restarts == {"feedback": 3}
    store = FeedbackStore(os.path.join(run.output_dir, "feedback.db"))
    try:
        stored = [r["submission_id"] for r in store.export("rankings")]
        assert sorted(stored) == sorted(out["acknowledged"]) and len(set(stored)) == NUM_TASKS
        assert store.stats()["tasks"] == NUM_TASKS  # the create that met a dead service made them once
    finally:
        store.close()
    sample = registry.get_sample_value
    assert sample("chatrl_trainer_service_restarts_total", {"run_id": run.run_id, "service": "feedback"}) == 3
    assert sample("chatrl_trainer_service_restarts_total", {"run_id": run.run_id, "service": "policy"}) == 0
    assert sample("chatrl_trainer_run_degraded", {"run_id": run.run_id}) == 1


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def __str__(self) -> str:
        return "connection refused"


class RestartingFeedback:
    """A feedback client whose service is down for the first ``down`` calls (the channel's own retries ran
    out), records what each CreateComparisonTasks attempt carried and how often it waited for health."""

    def __init__(self, down: int) -> None:
        self.down, self.request_ids, self.health_waits = down, [], 0

    def create_comparison_tasks(self, prompts, k, **kw):
        self.request_ids.append(kw["request_id"])
        if len(self.request_ids) <= self.down:
            raise Unavailable()
        return SimpleNamespace(task_ids=[f"t{i}" for i in range(len(prompts))], policy_model_version=3)

    def wait_health_known(self, timeout: float) -> str:
        self.health_waits += 1
        return "SERVING"


def test_a_create_retried_across_a_restart_carries_one_request_id():
    client = RestartingFeedback(down=2)
    got = labels.ServiceLabels(client).create_comparison_tasks(["a", "b"], 2, 8, 1.0, 7)
    assert got == (["t0", "t1"], 3)
    assert len(client.request_ids) == 3 and len(set(client.request_ids)) == 1
    assert client.health_waits == 2


def test_a_call_that_is_not_unavailable_is_not_retried():
    class Refusing(RestartingFeedback):
        def create_comparison_tasks(self, prompts, k, **kw):
            self.request_ids.append(kw["request_id"])
            raise ValueError("k: must be >= 2")

    client = Refusing(down=0)
    with pytest.raises(ValueError, match="k: must be"):
        labels.ServiceLabels(client).create_comparison_tasks(["a"], 1, 8, 1.0, 7)
    assert len(client.request_ids) == 1 and client.health_waits == 0
