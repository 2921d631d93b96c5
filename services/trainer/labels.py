"""The label path, once: prompts → comparison tasks → labelers rank them → the reward model's rankings.

Both ways of training a reward model from fresh labels run :func:`collect_rankings` over the feedback
*store API* (:class:`LabelStore`):

- the pipeline over the feedback service (:class:`ServiceLabels`, gRPC): tasks are sampled by
  policy-inference from the current policy, and people can label next to (or instead of) the
  simulated labelers, through the labeling page or ``SubmitRanking``;
- ``chatrl train reward`` over the SQLite store in-process (:class:`LocalLabels`, the same
  :class:`~chatrl.services.core.feedback_store.FeedbackStore` the service serves, in
  ``<run_dir>/feedback.db``): tasks are sampled in-process from the SFT model.

The flow: pick prompts → create one comparison task (K samples) per prompt → the *simulated labelers*
(a noisy gold preference function standing in for people) take tasks one at a time through
``next_task`` and rank them through ``submit_ranking``, exactly as a person would; with
``pipeline.labelers: 0`` nobody simulates and people label → wait until every task has a ranking,
reading only rankings stored after a cursor taken before the tasks existed (a long poll, no counting,
no re-reading of older labels) → snapshot them to JSONL (the stage's resume point).

The feedback service may die mid-labeling (kill -9, a pod rescheduled): :class:`ServiceLabels` rides
out its restart. Every call that fails with UNAVAILABLE after the channel's own retries waits for the
service to answer health again and is sent again — each one is safe twice: ``CreateComparisonTasks``
carries one ``request_id`` for all its attempts (the tasks are created once), ``NextTask`` gives a
labeler their own unexpired lease first, ``SubmitRanking`` is keyed by ``submission_id``, and the wait
re-reads from its cursor. The store is SQLite in WAL mode with ``synchronous=FULL``: an acknowledged
label is on disk before the answer leaves, so it is there after the restart.

No gRPC here: the gRPC client is handed in (``ServiceLabels(FeedbackClient(...))``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from chatrl.services.core.config import RunConfig
from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.core.formats import Prompt, Ranking, load_rankings, write_jsonl
from chatrl.services.core.generate import SamplingParams, generate
from chatrl.services.core.model import GPT
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer.stages.common import Reporter

WAIT_SLICE_S = 5.0  # one long poll; between polls the run's cancellation is checked
RESTART_WAIT_S = 600.0  # how long a label call waits for a restarting feedback service (a busy machine is slow)

log = logging.getLogger("chatrl.labels")


# Which prompts get comparison tasks: (prompts, how many, rng) → their indices
Select = Callable[[list[str], int, np.random.Generator], list[int]]


class LabelStore(Protocol):
    """The part of the feedback store API the label path uses. Tasks are dicts with ``task_id``,
    ``prompt``, ``responses`` and ``finished``; ranking rows are the store's export rows (each with
    its ``sequence``)."""

    def create_comparison_tasks(self, prompts: list[Prompt], k: int, max_new_tokens: int, temperature: float,
                                seed: int) -> tuple[list[str], int]: ...  # (task ids, policy version)

    def next_task(self, labeler_id: str) -> dict | None: ...

    def submit_ranking(self, submission_id: str, task_id: str, labeler_id: str, ranking: list[int]) -> None: ...

    def cursor(self) -> int: ...  # the newest ranking's sequence

    def rankings_after(self, after_sequence: int, wait_s: float) -> list[dict]: ...


class ExportStuck(Exception):
    """A long poll with no answer in time (see :meth:`ServiceLabels._export`): treated as UNAVAILABLE."""


def unavailable(e: BaseException) -> bool:
    """Whether ``e`` is a gRPC UNAVAILABLE (the service is down or restarting), told by its ``code()``
    (this module imports no gRPC), or a long poll that got no answer."""
    if isinstance(e, ExportStuck):
        return True
    code = getattr(e, "code", None)
    try:
        return callable(code) and getattr(code(), "name", "") == "UNAVAILABLE"
    except Exception:  # noqa: BLE001 - an exception whose code() needs arguments is not a gRPC status
        return False


class ServiceLabels:
    """The feedback service through its client (``chatrl.clients.lib.FeedbackClient``). A call that fails
    with UNAVAILABLE waits until the service answers health again and is sent again, for up to
    ``restart_wait_s`` in all; ``restarts_ridden`` counts those waits."""

    def __init__(self, client, restart_wait_s: float = RESTART_WAIT_S) -> None:
        self.client, self.restart_wait_s = client, restart_wait_s
        self.restarts_ridden = 0

    def _call(self, what: str, fn: Callable, *a, **kw):
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                return fn(*a, **kw)
            except Exception as e:
                left = deadline - time.monotonic()
                if not unavailable(e) or left <= 0:
                    raise
                self.restarts_ridden += 1
                log.warning("feedback %s: UNAVAILABLE (%s); waiting for the service and sending it again",
                            what, str(e)[:200])
                self.client.wait_health_known(left)

    def create_comparison_tasks(self, prompts, k, max_new_tokens, temperature, seed):
        request_id = uuid.uuid4().hex  # one for every attempt: a retry after a commit returns the same tasks
        res = self._call("CreateComparisonTasks", self.client.create_comparison_tasks, prompts, k,
                         max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, request_id=request_id)
        return list(res.task_ids), int(res.policy_model_version)

    def next_task(self, labeler_id):
        # again after a restart: the labeler's own unexpired lease comes first, so no second task is leased
        res = self._call("NextTask", self.client.next_task, labeler_id)
        if not res.HasField("task"):
            return None
        t = res.task
        return {"task_id": t.task_id, "prompt": t.prompt, "responses": list(t.responses),
                "finished": list(t.responses_finished) or [True] * len(t.responses)}

    def submit_ranking(self, submission_id, task_id, labeler_id, ranking):
        self._call("SubmitRanking", self.client.submit_ranking, submission_id, task_id, labeler_id, ranking)

    def cursor(self):
        return int(self._call("GetStats", self.client.stats).rankings_sequence)

    def rankings_after(self, after_sequence, wait_s):
        lines = self._call("Export", self._export, after_sequence, wait_s)
        return [json.loads(ln) for ln in lines]

    def _export(self, after_sequence: int, wait_s: float, give_up_s: float = 20.0) -> list[str]:
        """The long poll on a thread of its own, given up ``give_up_s`` after its wait as UNAVAILABLE (then
        read again from the same cursor: nothing is lost or seen twice). Measured: a server-streaming call
        whose server is killed before it answers can stay blocked in the channel's retry far past its
        deadline (grpcio), and the wait must not hang on it. An abandoned call ends with the client."""
        timeout = wait_s + 60.0  # the call's own deadline: generous, a busy machine is slow
        box: dict = {}

        def poll() -> None:
            try:
                box["lines"] = self.client.export("rankings", after_sequence=after_sequence, wait_seconds=wait_s,
                                                  timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                box["error"] = e

        t = threading.Thread(target=poll, name="labels-export", daemon=True)
        t.start()
        t.join(wait_s + give_up_s)
        if "error" in box:
            raise box["error"]
        if "lines" not in box:
            raise ExportStuck(f"Export (long poll of {wait_s:g}s) got no answer within {wait_s + give_up_s:g}s")
        return box["lines"]


class LocalLabels:
    """The SQLite store in this process; comparison samples come from ``policy`` (the SFT model)."""

    def __init__(self, store: FeedbackStore, policy: GPT, tok: ChatTokenizer, cfg: RunConfig,
                 policy_version: int = 0) -> None:
        self.store, self.policy, self.tok, self.cfg, self.version = store, policy, tok, cfg, policy_version

    def create_comparison_tasks(self, prompts, k, max_new_tokens, temperature, seed):
        def sampler(texts: list[str], kk: int):
            samples = sample_responses(self.policy, self.tok, texts, kk, temperature, max_new_tokens, seed, self.cfg)
            return [s[0] for s in samples], [s[1] for s in samples], self.version

        texts = [p for p in prompts if isinstance(p, str)]
        chats = [p for p in prompts if not isinstance(p, str)]
        return self.store.create_comparison_tasks(texts, [], k, sampler, source="chatrl train reward",
                                                  conversations=chats)

    def next_task(self, labeler_id):
        return self.store.next_task(labeler_id)[0]

    def submit_ranking(self, submission_id, task_id, labeler_id, ranking):
        self.store.submit_ranking(submission_id, task_id, labeler_id, ranking)

    def cursor(self):
        return self.store.sequence("rankings")

    def rankings_after(self, after_sequence, wait_s):
        self.store.wait_for_new("rankings", after_sequence, wait_s)
        return list(self.store.export("rankings", after_sequence=after_sequence))


def sample_responses(model: GPT, tok: ChatTokenizer, prompts: list[str], k: int, temperature: float,
                     max_new_tokens: int, seed: int, cfg: RunConfig, batch_prompts: int = 8
                     ) -> list[tuple[list[str], list[bool]]]:
    """K sampled responses per prompt, in-process: (texts, finished flags) per prompt. Sample s of
    prompt i uses ``derive_seed(seed, i, s)``."""
    out = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = prompts[i: i + batch_prompts]
        seqs, params = [], []
        for j, p in enumerate(chunk):
            ids = tok.prompt_ids(p)[-(model.cfg.max_seq_len - max_new_tokens):]
            for s in range(k):
                seqs.append(ids)
                params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                             seed=derive_seed(seed, i + j, s), stop_token_ids=(tok.end_id,)))
        samples = generate(model, seqs, params, tok.pad_id, cfg.dtype, cfg.device)
        for j in range(len(chunk)):
            dec = [tok.response_text(s.tokens) for s in samples[j * k:(j + 1) * k]]
            out.append(([d[0] for d in dec], [d[1] for d in dec]))
    return out


def label_with_simulated_labelers(labels: LabelStore, gold, n_labelers: int, noise: float,
                                  rng: np.random.Generator) -> int:
    """Stand-ins for people: each takes the next task, ranks it with the noisy gold function and
    submits, in turn, until no labeler gets a task. Returns the rankings submitted."""
    labelers = [f"simulated-labeler-{i}" for i in range(n_labelers)]
    done = 0
    while True:
        progressed = False
        for who in labelers:
            task = labels.next_task(who)
            if task is None:
                continue
            ranking = gold.rank(task["prompt"], task["responses"], task["finished"], rng, noise)
            labels.submit_ranking(f"{who}/{task['task_id']}", task["task_id"], who, [int(x) for x in ranking])
            done += 1
            progressed = True
        if not progressed:
            return done


def wait_for_rankings(labels: LabelStore, task_ids: set[str], cursor: int, reporter: Reporter,
                      wait_s: float = WAIT_SLICE_S) -> list[dict]:
    """Rankings of ``task_ids`` stored after ``cursor``, once each task has at least one (in store
    order; rankings of other tasks are skipped). Each read returns as soon as a ranking is stored."""
    rows: list[dict] = []
    ranked: set[str] = set()
    while not task_ids <= ranked:
        reporter.check_cancelled()
        for row in labels.rankings_after(cursor, wait_s):
            cursor = max(cursor, int(row["sequence"]))
            if row["task_id"] in task_ids:
                rows.append(row)
                ranked.add(row["task_id"])
    return rows


def collect_rankings(cfg: RunConfig, labels: LabelStore, prompts: list[Prompt], gold, name: str, out: Path,
                     reporter: Reporter, n_labelers: int | None = None, select: Select | None = None
                     ) -> list[Ranking]:
    """Fresh rankings for the reward model ``name`` (e.g. ``reward`` or ``r0``), snapshotted to ``out``
    (an existing snapshot is returned as is: the stage resumes from the same labels).
    ``n_labelers``: simulated labelers (default ``pipeline.labelers``); 0 = wait for people. ``select``:
    which prompts get tasks (``reward.active_selection``, :mod:`~chatrl.services.trainer.active`); default
    ``reward.num_prompts`` at random."""
    if out.exists():
        return load_rankings(out)
    rc = cfg.reward
    n_labelers = cfg.pipeline.labelers if n_labelers is None else n_labelers
    if n_labelers > 0 and gold is None:
        raise FileNotFoundError("no rankings: set data.rankings_file (labels from people), data.gold_file "
                                "(the simulated labeler), or pipeline.labelers: 0 (wait for people)")
    rng, n = np.random.default_rng(derive_seed(cfg.seed, name, "prompts")), min(rc.num_prompts, len(prompts))
    pick = select(prompts, n, rng) if select is not None else rng.choice(len(prompts), size=n, replace=False)
    t0 = time.perf_counter()
    cursor = labels.cursor()  # before the tasks exist: every ranking of them comes after it
    task_ids, version = labels.create_comparison_tasks(
        [prompts[i] for i in pick], rc.k, rc.max_new_tokens, rc.temperature, derive_seed(cfg.seed, name, "samples"))
    reporter.log(f"{name}: {len(task_ids)} comparison tasks (K={rc.k}) from policy v{version} "
                 f"in {time.perf_counter() - t0:.1f}s")
    if n_labelers > 0:
        rng = np.random.default_rng(derive_seed(cfg.seed, name, "labelers"))
        n = label_with_simulated_labelers(labels, gold, n_labelers, rc.label_noise, rng)
        reporter.log(f"{name}: {n_labelers} simulated labelers submitted {n} rankings")
    else:
        reporter.log(f"{name}: waiting for people to rank {len(task_ids)} tasks (feedback web page or "
                     f"SubmitRanking)…")
        reporter.awaiting_rankings(len(task_ids))
    try:
        rows = wait_for_rankings(labels, set(task_ids), cursor, reporter)
    finally:
        reporter.awaiting_rankings(0)
    write_jsonl(out, rows)
    rankings = load_rankings(out)
    reporter.log(f"{name}: {len(rankings)} rankings read ({time.perf_counter() - t0:.1f}s)")
    return rankings
