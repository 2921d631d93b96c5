"""The label store: prompts, comparison tasks, rankings, demonstrations.

SQLite (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``: when a ``submit_*`` call returns,
the label is committed and on disk (a ``kill -9`` right afterwards cannot lose it). No gRPC here, so
it lives in core: the feedback service (``services/feedback/server.py``, thin gRPC glue over this
module) serves it, and ``chatrl train reward`` uses it in-process — both through the one label path
of ``services/trainer/labels.py``.

- **Prompts** are deduplicated by text.
- **Comparison tasks**: one prompt, K ≥ 2 sampled responses (with a finished flag each: did the
  response end its turn with the end token), the policy model version that produced them. A task is
  *open* while it has fewer than ``rankings_per_task`` rankings. ``next_task`` leases an open task to
  one labeler for ``lease_seconds``; while the lease runs no other labeler receives it; an expired lease
  returns the task to the pool. A labeler never receives a task they have already ranked.
- **Multi-turn prompts**: a prompt may be a conversation ending with a user turn (``messages``; its
  ``text`` is the rendering "User: …\n\nAssistant: …"); the K responses are candidate next assistant
  turns. A single-turn prompt is one user message.
- **Rankings**: a permutation of 0..K-1, best first; one per (task, labeler), taken only from the labeler
  holding the task's lease (an expired lease still counts until the task is handed to someone else); ties
  (``tied_with_next``: K-1 booleans, a tied pair yields no preference pair) and a per-response
  assessment (a 1..7 rating, 0 = unrated, and flags from :data:`FLAGS`).
- **Skips**: the lease holder passes on a task with a reason; it is not offered to them again.
- **Overlap** (agreement): a fraction ``overlap_fraction`` of new tasks, chosen by their id, stays
  open until ``overlap_labelers`` distinct labelers ranked it, so that :meth:`agreement` has pairs of
  rankings of the same task to compare (``services/core/agreement.py``).
- **Demonstrations**: a conversation whose last message is the ideal assistant turn.
- **Idempotency**: every submission carries a client-chosen ``submission_id``. Re-submitting the same
  content returns the original id with ``duplicate=True``; the same id with different content is a
  ``conflict``.
- **Export** yields rows in the trainer's formats (``services/core/formats.py``) plus the metadata
  fields the proto documents for each ``ExportKind``, in the order they were stored; ``since``
  (inclusive) filters by time, ``limit`` 0 = all.
- **Sequence cursor**: every record has a ``sequence`` (its SQLite rowid), increasing in commit order
  (writes are serialised by ``BEGIN IMMEDIATE`` and rows are never deleted, so a later commit never
  gets a smaller sequence). ``export(kind, after_sequence=s)`` returns only what was stored after the
  record ``s``; ``wait_for_new`` blocks until there is such a record — a reader follows new labels
  without re-reading old ones or polling counts.

Errors are :class:`StoreError` with a ``kind`` (``invalid`` / ``not_found`` / ``conflict`` /
``unavailable``) and a message that starts with the offending field.

All times are integer microseconds since the Unix epoch (``*_us``); the clock is injectable.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from chatrl.services.core import agreement
from chatrl.services.core.formats import prompt_text

SCHEMA_VERSION = 2
ROLES = ("system", "user", "assistant")
# what can be wrong with a response (feedback.proto ResponseFlag, lower-case without the prefix)
FLAGS = ("fails_instruction", "made_up_facts", "harmful", "unfinished")
MAX_RATING = 7  # ratings are 1..MAX_RATING; 0 = not rated
MAX_REASON_CHARS = 1000  # a skip's reason
EXPORT_KINDS = ("rankings", "demonstrations", "prompts", "pairs")
_TABLE = {"pairs": "rankings"}  # an export kind's table, where the name differs (sequences are its rowids)
MAX_PROMPT_CHARS = 20_000
# caps on what a caller may store (issue 11): every field is bounded before it reaches the database lock
MAX_K = 64  # default bound on responses per task = entries of a ranking (the service passes its max_k)
MAX_ID_CHARS = 128  # submission, labeler, task and prompt ids
ACTIVE_WINDOW_S = 900  # a labeler who stored something this recently (or holds a lease) is active
MAX_SOURCE_CHARS = 256  # a prompt's source tag
MAX_MESSAGES = 64  # turns of one demonstration
MAX_DEMO_CHARS = 100_000  # all turns of one demonstration together (each also <= MAX_PROMPT_CHARS)
_PAGE = 500  # rows fetched per query while exporting (the lock is not held between pages)
MAX_WAIT_S = 60.0  # longest single wait_for_new (a waiting RPC holds a server thread)
_RECHECK_S = 1.0  # writers in other processes sharing the file cannot notify: re-check this often

_SCHEMA_V1 = """
CREATE TABLE prompts (
    id          TEXT PRIMARY KEY,
    text        TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL DEFAULT '',
    created_us  INTEGER NOT NULL
);
CREATE INDEX prompts_created ON prompts(created_us);
CREATE TABLE tasks (
    id                   TEXT PRIMARY KEY,
    prompt_id            TEXT NOT NULL REFERENCES prompts(id),
    k                    INTEGER NOT NULL CHECK (k >= 2),
    responses            TEXT NOT NULL,   -- JSON list of K strings
    finished             TEXT NOT NULL,   -- JSON list of K booleans
    policy_model_version INTEGER NOT NULL DEFAULT 0,
    created_us           INTEGER NOT NULL,
    n_rankings           INTEGER NOT NULL DEFAULT 0,
    lease_labeler        TEXT,
    lease_expires_us     INTEGER
);
CREATE INDEX tasks_open ON tasks(n_rankings, created_us);
CREATE TABLE rankings (
    id             TEXT PRIMARY KEY,
    task_id        TEXT NOT NULL REFERENCES tasks(id),
    labeler_id     TEXT NOT NULL,
    ranking        TEXT NOT NULL,          -- JSON list, best first
    submission_id  TEXT NOT NULL UNIQUE,
    created_us     INTEGER NOT NULL,
    UNIQUE (task_id, labeler_id)
);
CREATE INDEX rankings_created ON rankings(created_us);
CREATE TABLE demonstrations (
    id             TEXT PRIMARY KEY,
    labeler_id     TEXT NOT NULL,
    messages       TEXT NOT NULL,          -- JSON list of {"role","content"}
    submission_id  TEXT NOT NULL UNIQUE,
    created_us     INTEGER NOT NULL
);
CREATE INDEX demonstrations_created ON demonstrations(created_us);
"""

# Issue 13: conversations as prompts, ties/ratings/flags, skips, tasks that need several labelers.
_SCHEMA_V2 = """
ALTER TABLE prompts ADD COLUMN messages TEXT;          -- JSON conversation (ends with a user turn), NULL = text
ALTER TABLE tasks ADD COLUMN needed INTEGER NOT NULL DEFAULT 0;  -- rankings it needs, 0 = rankings_per_task
ALTER TABLE rankings ADD COLUMN tied_with_next TEXT;    -- JSON list of K-1 booleans, NULL = no ties
ALTER TABLE rankings ADD COLUMN assessments TEXT;       -- JSON list of K {"rating","flags"}, NULL = none
CREATE TABLE skips (
    id             TEXT PRIMARY KEY,
    task_id        TEXT NOT NULL REFERENCES tasks(id),
    labeler_id     TEXT NOT NULL,
    reason         TEXT NOT NULL,
    submission_id  TEXT NOT NULL UNIQUE,
    created_us     INTEGER NOT NULL,
    UNIQUE (task_id, labeler_id)
);
CREATE INDEX rankings_labeler ON rankings(labeler_id);
"""

# version -> SQL that upgrades the schema from version-1 to version.
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}


class StoreError(Exception):
    """A request the store refuses. ``kind``: invalid | not_found | conflict | unavailable."""

    def __init__(self, kind: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.kind = kind
        self.field = field
        self.message = str(self)


def _invalid(field: str, why: str) -> StoreError:
    return StoreError("invalid", field, why)


def rfc3339(us: int) -> str:
    """Microseconds since the epoch → RFC 3339 UTC string, e.g. ``2024-05-01T12:00:00.123456Z``."""
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_us(t: datetime | float | int | None) -> int | None:
    """A datetime (naive = UTC) or epoch seconds → epoch microseconds; None stays None."""
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        t = t.timestamp()
    return int(round(float(t) * 1e6))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _nonempty(value, field: str, cap: int = MAX_ID_CHARS) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(field, "must not be empty")
    if len(value) > cap:
        raise _invalid(field, f"must be at most {cap} characters, got {len(value)}")
    return value


def _bounded_ranking(ranking, max_k: int, field: str = "ranking") -> list[int]:
    """The ranking as a list of ints, refused by its length first (before it is copied or looked at)."""
    if isinstance(ranking, (str, bytes)):
        raise _invalid(field, "must be a list of integers")
    n = len(ranking)
    if n > max_k:
        raise _invalid(field, f"must have at most {max_k} entries (K <= {max_k}), got {n}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
        raise _invalid(field, "must be a list of integers")
    return [int(x) for x in ranking]


def check_ranking(ranking: Sequence[int], k: int, field: str = "ranking") -> list[int]:
    """A permutation of 0..k-1, or an ``invalid`` error naming duplicates, missing and out-of-range ranks."""
    if isinstance(ranking, (str, bytes)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                    for x in ranking):
        raise _invalid(field, "must be a list of integers")
    r = [int(x) for x in ranking]
    if sorted(r) != list(range(k)):  # diagnostics in linear time: one pass counting each value
        seen: dict[int, int] = {}
        for x in r:
            seen[x] = seen.get(x, 0) + 1
        dup = sorted(x for x, c in seen.items() if c > 1)
        missing = [x for x in range(k) if x not in seen]
        bad = sorted(x for x in seen if x < 0 or x >= k)
        parts = [f"must be a permutation of 0..{k - 1} (got {len(r)} entries"]
        if dup:
            parts.append(f"duplicates {dup}")
        if missing:
            parts.append(f"missing {missing}")
        if bad:
            parts.append(f"out of range {bad}")
        raise _invalid(field, ", ".join(parts) + ")")
    return r


def check_messages(messages, field: str = "messages", last: str = "assistant") -> list[dict]:
    """Conversation as [{"role","content"}]: non-empty, known roles, non-empty contents, last turn ``last``
    (a demonstration ends with the assistant turn; a prompt with the user turn the responses answer)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise _invalid(field, "must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise _invalid(field, f"must have at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"{field}[{i}]", "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _invalid(f"{field}[{i}].role", f"must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _invalid(f"{field}[{i}].content", "must not be empty")
        if len(content) > MAX_PROMPT_CHARS:
            raise _invalid(f"{field}[{i}].content", f"must be at most {MAX_PROMPT_CHARS} characters, "
                           f"got {len(content)}")
        total += len(content)
        if total > MAX_DEMO_CHARS:
            raise _invalid(field, f"must be at most {MAX_DEMO_CHARS} characters in all")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != last:
        raise _invalid(f"{field}[{len(out) - 1}].role", f"the last message must be the {last} turn, "
                       f"got {out[-1]['role']!r}")
    return out


def check_ties(tied_with_next, k: int, field: str = "tied_with_next") -> list[bool] | None:
    """None/empty (no ties) or K-1 booleans."""
    if not tied_with_next:
        return None
    if isinstance(tied_with_next, (str, bytes)) or len(tied_with_next) != k - 1 or \
            not all(isinstance(b, bool) for b in tied_with_next):
        raise _invalid(field, f"must be empty or {k - 1} booleans (one per adjacent pair of the ranking)")
    return list(tied_with_next) if any(tied_with_next) else None


def check_assessments(assessments, k: int, field: str = "assessments") -> list[dict] | None:
    """None/empty or K {"rating": 0..7, "flags": [distinct names from FLAGS]} (by response index)."""
    if not assessments:
        return None
    if isinstance(assessments, (str, bytes, dict)) or len(assessments) != k:
        raise _invalid(field, f"must be empty or {k} assessments (one per response)")
    out = []
    for i, a in enumerate(assessments):
        if not isinstance(a, dict):
            raise _invalid(f"{field}[{i}]", "must be an object with rating and flags")
        rating, flags = a.get("rating", 0), a.get("flags", [])
        if isinstance(rating, bool) or not isinstance(rating, int) or not 0 <= rating <= MAX_RATING:
            raise _invalid(f"{field}[{i}].rating", f"must be an integer 1..{MAX_RATING} (0 = not rated), got "
                           f"{str(rating)[:20]!r}")
        if not isinstance(flags, (list, tuple)) or len(flags) > len(FLAGS) or \
                not all(isinstance(f, str) and f in FLAGS for f in flags) or len(set(flags)) != len(flags):
            raise _invalid(f"{field}[{i}].flags", f"must be distinct names from {list(FLAGS)}")
        out.append({"rating": rating, "flags": sorted(flags, key=FLAGS.index)})
    return out


def untied_pairs(k: int, tied_with_next: Sequence[bool] | None) -> int:
    """Preference pairs a ranking yields: C(K,2) less the pairs inside each group of tied responses."""
    groups, run = [], 1
    for tied in tied_with_next or []:
        if tied:
            run += 1
        else:
            groups.append(run)
            run = 1
    groups.append(run)
    return k * (k - 1) // 2 - sum(g * (g - 1) // 2 for g in groups)


def _require_lease(holder: str | None, task_id: str, labeler_id: str) -> None:
    """A ranking or skip is taken only from the labeler holding the task's lease: the one NextTask (or the
    chat's alternatives) last gave it to. A lease that ran out still counts until another labeler is given
    the task, so a slow labeler loses their work only to someone who was actually handed it."""
    if holder != labeler_id:
        why = "it is leased to another labeler" if holder else "it is not leased to anyone (NextTask leases it)"
        raise StoreError("precondition", "task_id", f"task {task_id!r}: labeler {labeler_id[:64]!r} does not "
                         f"hold its lease; {why}")


def _rollback(db: sqlite3.Connection) -> None:
    """ROLLBACK if a transaction is still open (SQLite rolls some failures back itself)."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _db_error(e: BaseException) -> StoreError:
    """A database failure as the caller's error kind: full → ``exhausted``, anything else ``unavailable``."""
    code = getattr(e, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(e):
        return StoreError("exhausted", "", f"the label database is full ({e}); nothing was stored")
    return StoreError("unavailable", "", f"the label database failed ({e}); nothing was stored; retry")


Sampler = Callable[[list, int], tuple[list[list[str]], list[list[bool]], int]]
"""(prompts, k) → (K responses per prompt, K finished flags per prompt, policy model version). A prompt is
its text (one user turn), or for a multi-turn prompt the conversation: a list of {"role","content"}."""


class FeedbackStore:
    """Thread-safe: one connection guarded by a lock; every write is one ``BEGIN IMMEDIATE`` transaction
    (so several processes may share the file too)."""

    def __init__(self, path: str | Path, *, lease_seconds: float = 600.0, rankings_per_task: int = 1,
                 clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0, max_k: int = MAX_K,
                 max_db_mb: float = 0, overlap_fraction: float = 0.0, overlap_labelers: int = 2) -> None:
        """``max_k``: most responses per task (and entries per ranking); ``max_db_mb`` > 0 caps the
        database file (SQLite ``max_page_count``): a write that does not fit answers ``exhausted``, as a
        full disk does, and later writes that fit work (keep it below the volume's size).
        ``overlap_fraction`` of new tasks need ``overlap_labelers`` distinct rankings (agreement)."""
        if not 0.0 <= overlap_fraction <= 1.0:
            raise ValueError(f"overlap_fraction must be in [0, 1], got {overlap_fraction}")
        if overlap_labelers < 2:
            raise ValueError(f"overlap_labelers must be >= 2, got {overlap_labelers}")
        self.overlap_fraction, self.overlap_labelers = float(overlap_fraction), int(overlap_labelers)
        self._agreement_cache: tuple[int, dict] | None = None
        if lease_seconds <= 0 or not math.isfinite(lease_seconds):
            raise ValueError(f"lease_seconds must be a positive number, got {lease_seconds}")
        if rankings_per_task < 1:
            raise ValueError(f"rankings_per_task must be >= 1, got {rankings_per_task}")
        self.path = Path(path)
        self.lease_us = int(lease_seconds * 1e6)
        self.rankings_per_task = int(rankings_per_task)
        if max_k < 2:
            raise ValueError(f"max_k must be >= 2, got {max_k}")
        self.max_k = int(max_k)
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified after every commit in this process
        self._closed = False
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if max_db_mb > 0:
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count={max(1, int(max_db_mb * 1024 * 1024 // page))}")
        self._migrate()

    # -- plumbing ------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(round(self._clock() * 1e6))

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            # idempotency keys of CreateComparisonTasks → the JSON of the first result (outside the
            # numbered migrations: any schema version may gain it)
            db.execute("CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, result TEXT NOT NULL, "
                       "created_us INTEGER NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            have = int(row[0]) if row else 0
            if have > SCHEMA_VERSION:
                raise StoreError("unavailable", "", f"{self.path}: schema version {have} is newer than this "
                                 f"code supports ({SCHEMA_VERSION}); upgrade chatrl")
            for v in range(have + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            # stats()' active-labeler window reads skips by time (an index any v2 database may gain)
            db.execute("CREATE INDEX IF NOT EXISTS skips_created ON skips(created_us)")
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                       (str(SCHEMA_VERSION),))
            if not row:
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('created_us', ?)", (str(self._now()),))

    class _Tx:
        def __init__(self, store: FeedbackStore) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> bool:
            db = self.store._db
            try:
                if exc_type is None:
                    try:
                        db.execute("COMMIT")  # a full disk shows up here in WAL mode
                    except sqlite3.Error as e:
                        _rollback(db)  # else the transaction stays open and every later BEGIN fails
                        raise _db_error(e) from None
                    self.store._changed.notify_all()
                    return False
                _rollback(db)
                if issubclass(exc_type, sqlite3.Error):
                    raise _db_error(exc) from None
                return False
            finally:
                self.store._lock.release()

    def _tx(self) -> FeedbackStore._Tx:
        return FeedbackStore._Tx(self)

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key='schema_version'")[0][0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify_all()  # waiters return (nothing new) instead of reading a closed db
            self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompts -------------------------------------------------------------------------------

    @staticmethod
    def _check_prompt(text, field: str) -> str:
        text = _nonempty(text, field, cap=len(text) if isinstance(text, str) else 0)
        if len(text) > MAX_PROMPT_CHARS:
            raise _invalid(field, f"is too long ({len(text)} characters, at most {MAX_PROMPT_CHARS})")
        return text

    def _upsert_prompt(self, db: sqlite3.Connection, text: str, source: str, now: int,
                       messages: list[dict] | None = None) -> tuple[str, bool]:
        """``messages``: a multi-turn prompt (``text`` is then its rendering, the pool's key)."""
        row = db.execute("SELECT id FROM prompts WHERE text=?", (text,)).fetchone()
        if row:
            return row[0], False
        pid = _new_id("p")
        multi = messages is not None and prompt_text(messages) != messages[-1]["content"]
        db.execute("INSERT INTO prompts(id, text, source, created_us, messages) VALUES (?,?,?,?,?)",
                   (pid, text, source, now, json.dumps(messages, ensure_ascii=False) if multi else None))
        return pid, True

    @staticmethod
    def _check_conversation(messages, field: str) -> tuple[str, list[dict]]:
        """(its text, the checked conversation) of a multi-turn prompt, which ends with a user turn."""
        msgs = check_messages(messages, field, last="user")
        text = prompt_text(msgs)
        if len(text) > MAX_DEMO_CHARS:
            raise _invalid(field, f"must be at most {MAX_DEMO_CHARS} characters in all")
        return text, msgs

    def add_prompts(self, prompts: Sequence[str | tuple[str, str]], field: str = "prompts") -> tuple[list[str], int]:
        """Adds prompts (text, or (text, source)); returns (one id per prompt in order, how many were new)."""
        items = []
        for i, p in enumerate(prompts):
            text, source = (p, "") if isinstance(p, str) else (p[0], p[1] or "")
            if len(str(source)) > MAX_SOURCE_CHARS:
                raise _invalid(f"{field}[{i}].source", f"must be at most {MAX_SOURCE_CHARS} characters, "
                               f"got {len(str(source))}")
            items.append((self._check_prompt(text, f"{field}[{i}].text" if not isinstance(p, str) else
                                             f"{field}[{i}]"), str(source)))
        ids, added = [], 0
        with self._tx() as db:
            now = self._now()
            for text, source in items:
                pid, new = self._upsert_prompt(db, text, source, now)
                ids.append(pid)
                added += new
        return ids, added

    def get_prompt(self, prompt_id: str) -> dict:
        rows = self._read("SELECT * FROM prompts WHERE id=?", (prompt_id,))
        if not rows:
            raise StoreError("not_found", "prompt_id", f"no prompt with id {prompt_id!r}")
        r = rows[0]
        return {"prompt_id": r["id"], "text": r["text"], "source": r["source"], "created_us": r["created_us"]}

    # -- comparison tasks ----------------------------------------------------------------------

    def _check_samples(self, k: int, responses, finished, field: str) -> tuple[list[str], list[bool]]:
        if not isinstance(responses, (list, tuple)) or len(responses) != k:
            n = len(responses) if isinstance(responses, (list, tuple)) else type(responses).__name__
            raise _invalid(f"{field}.responses", f"expected {k} responses, got {n}")
        if not all(isinstance(r, str) for r in responses):
            raise _invalid(f"{field}.responses", "must be strings")
        fin = [True] * k if finished is None else list(finished)
        if len(fin) != k or not all(isinstance(b, bool) for b in fin):
            raise _invalid(f"{field}.finished", f"must be {k} booleans")
        return list(responses), fin

    def _overlaps(self, task_id: str) -> bool:
        """Whether a new task goes to several labelers: its random id decides, so a fraction
        ``overlap_fraction`` of tasks does, with no state to keep."""
        return int(task_id.rsplit("_", 1)[-1][:8], 16) / 0x100000000 < self.overlap_fraction

    def _insert_task(self, db, prompt_id: str, k: int, responses, finished, version: int, now: int) -> str:
        tid = _new_id("t")
        needed = self.overlap_labelers if self._overlaps(tid) else 0
        db.execute("INSERT INTO tasks(id, prompt_id, k, responses, finished, policy_model_version, created_us, "
                   "needed) VALUES (?,?,?,?,?,?,?,?)",
                   (tid, prompt_id, k, json.dumps(responses, ensure_ascii=False), json.dumps(finished),
                    int(version), now, needed))
        return tid

    def create_tasks(self, tasks: Sequence[dict], policy_model_version: int = 0,
                     lease_to: str | None = None) -> list[str]:
        """Creates ranking tasks from ready samples. Each item: {"prompt" (text), "messages" (a multi-turn
        prompt ending with a user turn) or "prompt_id", "responses", optional "finished", optional
        "source"}. K is len(responses) and must be >= 2. ``lease_to``: lease them to this labeler at once
        (the labeling app's chat-then-compare: the labeler who asked for alternatives ranks them)."""
        if lease_to is not None:
            _nonempty(lease_to, "labeler_id")
        if not tasks:
            raise _invalid("tasks", "must not be empty")
        checked = []
        for i, t in enumerate(tasks):
            resp = t.get("responses")
            k = len(resp) if isinstance(resp, (list, tuple)) else 0
            if k < 2:
                raise _invalid(f"tasks[{i}].responses", f"K must be >= 2, got {k}")
            if k > self.max_k:
                raise _invalid(f"tasks[{i}].responses", f"K must be <= {self.max_k}, got {k}")
            resp, fin = self._check_samples(k, resp, t.get("finished"), f"tasks[{i}]")
            if t.get("prompt_id"):
                checked.append(("id", t["prompt_id"], k, resp, fin, i))
            elif t.get("messages") is not None:
                text, msgs = self._check_conversation(t["messages"], f"tasks[{i}].messages")
                checked.append(("chat", (text, t.get("source") or "", msgs), k, resp, fin, i))
            else:
                text = self._check_prompt(t.get("prompt"), f"tasks[{i}].prompt")
                if len(str(t.get("source") or "")) > MAX_SOURCE_CHARS:
                    raise _invalid(f"tasks[{i}].source", f"must be at most {MAX_SOURCE_CHARS} characters")
                checked.append(("text", (text, t.get("source") or ""), k, resp, fin, i))
        ids = []
        with self._tx() as db:
            now = self._now()
            for how, p, k, resp, fin, i in checked:
                if how == "id":
                    if not db.execute("SELECT 1 FROM prompts WHERE id=?", (p,)).fetchone():
                        raise StoreError("not_found", f"tasks[{i}].prompt_id", f"no prompt with id {p!r}")
                    pid = p
                else:
                    pid, _ = self._upsert_prompt(db, p[0], p[1], now, p[2] if how == "chat" else None)
                ids.append(self._insert_task(db, pid, k, resp, fin, policy_model_version, now))
            if lease_to is not None:
                db.executemany("UPDATE tasks SET lease_labeler=?, lease_expires_us=? WHERE id=?",
                               [(lease_to, now + self.lease_us, tid) for tid in ids])
        return ids

    def create_comparison_tasks(self, prompts: Sequence[str], prompt_ids: Sequence[str], k: int,
                                sampler: Sampler, source: str = "", conversations: Sequence = (),
                                request_id: str = "") -> tuple[list[str], int]:
        """Validates the request, asks ``sampler`` for K samples per prompt (outside the lock), then
        stores new prompts and one task per prompt in one transaction. ``conversations``: multi-turn
        prompts (lists of {"role","content"} ending with a user turn). Returns (task ids in request
        order: prompts, then prompt_ids, then conversations; the policy model version). A ``request_id``
        seen before returns that request's result and creates nothing (a client's retry)."""
        if request_id:
            _nonempty(request_id, "request_id", 64)
            first = self._request_result(request_id)
            if first is not None:
                return first
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= self.max_k:
            raise _invalid("k", f"must be in [2, {self.max_k}] (responses to rank per prompt), got {k}")
        if len(source) > MAX_SOURCE_CHARS:
            raise _invalid("source", f"must be at most {MAX_SOURCE_CHARS} characters")
        if not prompts and not prompt_ids and not conversations:
            raise _invalid("prompts", "no prompts given (set prompts, prompt_ids or conversations)")
        texts = [self._check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        chats = [self._check_conversation(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
        for i, pid in enumerate(prompt_ids):
            _nonempty(pid, f"prompt_ids[{i}]")
        rows = {r["id"]: (r["text"] if r["messages"] is None else json.loads(r["messages"])) for r in self._read(
            f"SELECT id, text, messages FROM prompts WHERE id IN ({','.join('?' * len(prompt_ids))})",
            list(prompt_ids))} if prompt_ids else {}
        for i, pid in enumerate(prompt_ids):
            if pid not in rows:
                raise StoreError("not_found", f"prompt_ids[{i}]", f"no prompt with id {pid!r}")
        all_texts = texts + [rows[pid] for pid in prompt_ids] + [m for _, m in chats]
        responses, finished, version = sampler(all_texts, k)
        if len(responses) != len(all_texts) or len(finished) != len(all_texts):
            raise StoreError("unavailable", "", f"policy returned samples for {len(responses)} prompts, "
                             f"expected {len(all_texts)}")
        samples = [self._check_samples(k, r, f, f"samples[{i}]") for i, (r, f) in
                   enumerate(zip(responses, finished))]
        ids = []
        with self._tx() as db:
            if request_id:  # an attempt of the same request committed while this one sampled
                row = db.execute("SELECT result FROM requests WHERE id=?", (request_id,)).fetchone()
                if row is not None:
                    first = json.loads(row[0])
                    return first["task_ids"], first["version"]
            now = self._now()
            pids = [self._upsert_prompt(db, t, source, now)[0] for t in texts] + list(prompt_ids) + \
                [self._upsert_prompt(db, t, source, now, m)[0] for t, m in chats]
            for pid, (resp, fin) in zip(pids, samples):
                ids.append(self._insert_task(db, pid, k, resp, fin, version, now))
            if request_id:
                db.execute("INSERT INTO requests(id, result, created_us) VALUES (?,?,?)",
                           (request_id, json.dumps({"task_ids": ids, "version": int(version)}), now))
        return ids, int(version)

    def _request_result(self, request_id: str) -> tuple[list[str], int] | None:
        rows = self._read("SELECT result FROM requests WHERE id=?", (request_id,))
        if not rows:
            return None
        first = json.loads(rows[0][0])
        return first["task_ids"], first["version"]

    @staticmethod
    def _messages(text: str, messages: str | None) -> list[dict]:
        return json.loads(messages) if messages else [{"role": "user", "content": text}]

    @staticmethod
    def _task_dict(r: sqlite3.Row) -> dict:
        return {"task_id": r["id"], "prompt_id": r["prompt_id"], "prompt": r["text"],
                "messages": FeedbackStore._messages(r["text"], r["messages"]),
                "responses": json.loads(r["responses"]), "finished": json.loads(r["finished"]),
                "policy_model_version": r["policy_model_version"], "created_us": r["created_us"],
                "lease_labeler": r["lease_labeler"], "lease_expires_us": r["lease_expires_us"],
                "n_rankings": r["n_rankings"]}

    def get_task(self, task_id: str) -> dict:
        rows = self._read("SELECT t.*, p.text, p.messages FROM tasks t JOIN prompts p ON p.id = t.prompt_id WHERE t.id=?",
                          (task_id,))
        if not rows:
            raise StoreError("not_found", "task_id", f"no task with id {task_id!r}")
        return self._task_dict(rows[0])

    # Tasks a labeler may receive: open (fewer rankings than it needs), not ranked or skipped by them, not
    # leased to someone else right now. Arguments: rankings_per_task, labeler x3, now.
    _AVAILABLE = ("FROM tasks t WHERE t.n_rankings < MAX(t.needed, ?) "
                  "AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.task_id = t.id AND r.labeler_id = ?) "
                  "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.task_id = t.id AND s.labeler_id = ?) "
                  "AND (t.lease_labeler IS NULL OR t.lease_labeler = ? OR t.lease_expires_us <= ?)")

    def next_task(self, labeler_id: str) -> tuple[dict | None, int]:
        """Leases the next task to ``labeler_id`` (their own unexpired lease first, then the oldest open
        task); returns (task or None, open tasks left for this labeler besides this one)."""
        _nonempty(labeler_id, "labeler_id")
        with self._tx() as db:
            now = self._now()
            args = (self.rankings_per_task, labeler_id, labeler_id, labeler_id, now)
            row = db.execute(f"SELECT t.id {self._AVAILABLE} ORDER BY COALESCE(t.lease_labeler = ? AND "
                             "t.lease_expires_us > ?, 0) DESC, t.created_us, t.rowid LIMIT 1",
                             (*args, labeler_id, now)).fetchone()
            total = db.execute(f"SELECT COUNT(*) {self._AVAILABLE}", args).fetchone()[0]
            if row is None:
                return None, 0
            db.execute("UPDATE tasks SET lease_labeler=?, lease_expires_us=? WHERE id=?",
                       (labeler_id, now + self.lease_us, row[0]))
            task = db.execute("SELECT t.*, p.text, p.messages FROM tasks t JOIN prompts p ON p.id = t.prompt_id "
                              "WHERE t.id=?", (row[0],)).fetchone()
            return self._task_dict(task), total - 1

    # -- submissions ---------------------------------------------------------------------------

    def _other_kind_uses(self, db, own: str, submission_id: str) -> None:
        for table in ("rankings", "demonstrations", "skips"):
            if table != own and db.execute(f"SELECT 1 FROM {table} WHERE submission_id=?",
                                           (submission_id,)).fetchone():
                raise StoreError("conflict", "submission_id",
                                 f"{submission_id!r} was already used for a {table[:-1]} submission")

    def submit_ranking(self, submission_id: str, task_id: str, labeler_id: str, ranking: Sequence[int],
                       tied_with_next: Sequence[bool] | None = None, assessments: Sequence[dict] | None = None
                       ) -> tuple[str, bool, int]:
        """Stores a ranking (best first), its ties (K-1 booleans) and assessments (K {"rating","flags"}),
        both optional. Returns (ranking id, duplicate, preference pairs: C(K,2) less tied pairs).
        Everything about the request is checked before the lock (sizes first); under it only the
        comparison with the task's K, in O(K)."""
        ranking = _bounded_ranking(ranking, self.max_k)
        for name, v in (("tied_with_next", tied_with_next), ("assessments", assessments)):
            if v is not None and (isinstance(v, (str, bytes, dict)) or len(v) > self.max_k):
                raise _invalid(name, f"must be a list of at most {self.max_k} entries")
        _nonempty(submission_id, "submission_id")
        _nonempty(task_id, "task_id")
        _nonempty(labeler_id, "labeler_id")
        with self._tx() as db:
            prev = db.execute("SELECT r.*, t.k FROM rankings r JOIN tasks t ON t.id = r.task_id "
                              "WHERE r.submission_id=?", (submission_id,)).fetchone()
            if prev is not None:
                k = prev["k"]
                ties = check_ties(tied_with_next, k) if len(ranking) == k else "mismatch"
                same = (prev["task_id"] == task_id and prev["labeler_id"] == labeler_id
                        and json.loads(prev["ranking"]) == ranking
                        and json.loads(prev["tied_with_next"] or "null") == ties
                        and json.loads(prev["assessments"] or "null") == check_assessments(assessments, k))
                if not same:
                    raise StoreError("conflict", "submission_id", f"{submission_id!r} was already used for a "
                                     "different ranking (task, labeler, order, ties or assessments differ)")
                return prev["id"], True, untied_pairs(k, ties)
            self._other_kind_uses(db, "rankings", submission_id)
            task = db.execute("SELECT id, k, lease_labeler FROM tasks WHERE id=?", (task_id,)).fetchone()
            if task is None:
                raise StoreError("not_found", "task_id", f"no task with id {task_id!r}")
            k = task["k"]
            ranking = check_ranking(ranking, k)
            ties = check_ties(tied_with_next, k)
            judged = check_assessments(assessments, k)
            if db.execute("SELECT 1 FROM rankings WHERE task_id=? AND labeler_id=?",
                          (task_id, labeler_id)).fetchone():
                raise StoreError("conflict", "task_id", f"task {task_id!r} was already ranked by labeler "
                                 f"{labeler_id!r} (under another submission_id)")
            _require_lease(task["lease_labeler"], task_id, labeler_id)
            rid = _new_id("r")
            db.execute("INSERT INTO rankings(id, task_id, labeler_id, ranking, submission_id, created_us, "
                       "tied_with_next, assessments) VALUES (?,?,?,?,?,?,?,?)",
                       (rid, task_id, labeler_id, json.dumps(ranking), submission_id, self._now(),
                        None if ties is None else json.dumps(ties),
                        None if judged is None else json.dumps(judged)))
            db.execute("UPDATE tasks SET n_rankings = n_rankings + 1, lease_labeler=NULL, lease_expires_us=NULL "
                       "WHERE id=?", (task_id,))
            return rid, False, untied_pairs(k, ties)

    def skip_task(self, submission_id: str, task_id: str, labeler_id: str, reason: str) -> tuple[str, bool]:
        """Records that ``labeler_id`` passes on a task (and why): it is not offered to them again and their
        lease ends. Returns (skip id, duplicate)."""
        _nonempty(submission_id, "submission_id")
        _nonempty(task_id, "task_id")
        _nonempty(labeler_id, "labeler_id")
        reason = _nonempty(reason, "reason", MAX_REASON_CHARS)
        with self._tx() as db:
            prev = db.execute("SELECT * FROM skips WHERE submission_id=?", (submission_id,)).fetchone()
            if prev is not None:
                if (prev["task_id"], prev["labeler_id"], prev["reason"]) != (task_id, labeler_id, reason):
                    raise StoreError("conflict", "submission_id", f"{submission_id!r} was already used for a "
                                     "different skip")
                return prev["id"], True
            self._other_kind_uses(db, "skips", submission_id)
            task = db.execute("SELECT lease_labeler FROM tasks WHERE id=?", (task_id,)).fetchone()
            if task is None:
                raise StoreError("not_found", "task_id", f"no task with id {task_id!r}")
            for table, what in (("rankings", "ranked"), ("skips", "skipped")):
                if db.execute(f"SELECT 1 FROM {table} WHERE task_id=? AND labeler_id=?",
                              (task_id, labeler_id)).fetchone():
                    raise StoreError("conflict", "task_id", f"task {task_id!r} was already {what} by labeler "
                                     f"{labeler_id!r}")
            _require_lease(task["lease_labeler"], task_id, labeler_id)
            sid = _new_id("s")
            db.execute("INSERT INTO skips(id, task_id, labeler_id, reason, submission_id, created_us) "
                       "VALUES (?,?,?,?,?,?)", (sid, task_id, labeler_id, reason, submission_id, self._now()))
            db.execute("UPDATE tasks SET lease_labeler=NULL, lease_expires_us=NULL WHERE id=?", (task_id,))
            return sid, False

    def submit_demonstration(self, submission_id: str, labeler_id: str, messages) -> tuple[str, bool]:
        """Stores a demonstration ([{"role","content"}], last turn assistant). Returns (id, duplicate)."""
        _nonempty(submission_id, "submission_id")
        _nonempty(labeler_id, "labeler_id")
        msgs = check_messages(messages)
        with self._tx() as db:
            prev = db.execute("SELECT * FROM demonstrations WHERE submission_id=?", (submission_id,)).fetchone()
            if prev is not None:
                if prev["labeler_id"] != labeler_id or json.loads(prev["messages"]) != msgs:
                    raise StoreError("conflict", "submission_id", f"{submission_id!r} was already used for a "
                                     "different demonstration")
                return prev["id"], True
            self._other_kind_uses(db, "demonstrations", submission_id)
            did = _new_id("d")
            db.execute("INSERT INTO demonstrations(id, labeler_id, messages, submission_id, created_us) "
                       "VALUES (?,?,?,?,?)",
                       (did, labeler_id, json.dumps(msgs, ensure_ascii=False), submission_id, self._now()))
            return did, False

    # -- export & stats ------------------------------------------------------------------------

    def _paged(self, sql: str, since_us: int | None, limit: int, after_sequence: int) -> Iterator[sqlite3.Row]:
        """Rows of ``sql`` (which selects ``x.rowid AS rid`` from alias x) with sequence > ``after_sequence``
        (and ``x.created_us >= since_us``), in sequence order, keyset-paginated so no lock or cursor is
        held while the caller consumes rows."""
        last = after_sequence
        left = limit or None
        since = "" if since_us is None else f" AND x.created_us >= {int(since_us)}"
        while True:
            n = _PAGE if left is None else min(_PAGE, left)
            rows = self._read(f"{sql} WHERE x.rowid > ?{since} ORDER BY x.rowid LIMIT ?", (last, n))
            yield from rows
            if left is not None:
                left -= len(rows)
                if left <= 0:
                    return
            if len(rows) < n:
                return
            last = rows[-1]["rid"]

    def export_rankings(self, since=None, limit: int = 0, after_sequence: int = 0) -> Iterator[dict]:
        """Rows in the trainer's rankings format ({"prompt","responses","ranking","finished"}) plus metadata."""
        sql = ("SELECT x.*, x.rowid AS rid, t.prompt_id, t.responses, t.finished, t.policy_model_version, t.k, "
               "p.text, p.messages FROM rankings x JOIN tasks t ON t.id = x.task_id "
               "JOIN prompts p ON p.id = t.prompt_id")
        for r in self._paged(sql, to_us(since), limit, after_sequence):
            k = r["k"]
            judged = json.loads(r["assessments"]) if r["assessments"] else [{"rating": 0, "flags": []}] * k
            yield {"sequence": r["rid"], "ranking_id": r["id"], "task_id": r["task_id"], "prompt_id": r["prompt_id"],
                   "prompt": r["text"], "messages": self._messages(r["text"], r["messages"]),
                   "responses": json.loads(r["responses"]),
                   "ranking": json.loads(r["ranking"]), "finished": json.loads(r["finished"]),
                   "tied_with_next": json.loads(r["tied_with_next"]) if r["tied_with_next"] else [False] * (k - 1),
                   "ratings": [a["rating"] for a in judged], "flags": [a["flags"] for a in judged],
                   "labeler_id": r["labeler_id"], "submission_id": r["submission_id"],
                   "policy_model_version": r["policy_model_version"], "created_at": rfc3339(r["created_us"])}

    def export_pairs(self, since=None, limit: int = 0, after_sequence: int = 0) -> Iterator[dict]:
        """Every ranking as its preference pairs — one row per pair of responses in different tiers (a tied
        pair is no preference), ``{"prompt","chosen","rejected"}`` as TRL's and OpenRLHF's reward trainers
        read them, plus "messages" (the prompt conversation), "chosen_finished" / "rejected_finished",
        "ranking_id", "labeler_id" and the ranking's
        "sequence" (shared by its pairs; ``limit`` counts rankings)."""
        for r in self.export_rankings(since, limit, after_sequence):
            tier = agreement.tiers(r["ranking"], r["tied_with_next"])
            resp = r["responses"]
            for a in range(len(resp)):
                for b in range(len(resp)):
                    if tier[a] < tier[b]:
                        yield {"sequence": r["sequence"], "prompt": r["prompt"], "messages": r["messages"],
                               "chosen": resp[a], "rejected": resp[b], "chosen_finished": r["finished"][a],
                               "rejected_finished": r["finished"][b], "ranking_id": r["ranking_id"],
                               "labeler_id": r["labeler_id"], "created_at": r["created_at"]}

    def export_demonstrations(self, since=None, limit: int = 0, after_sequence: int = 0) -> Iterator[dict]:
        """Rows in the trainer's SFT format ({"messages": [...]}) plus metadata."""
        for r in self._paged("SELECT x.*, x.rowid AS rid FROM demonstrations x", to_us(since), limit,
                             after_sequence):
            yield {"sequence": r["rid"], "demonstration_id": r["id"], "messages": json.loads(r["messages"]),
                   "labeler_id": r["labeler_id"], "submission_id": r["submission_id"],
                   "created_at": rfc3339(r["created_us"])}

    def export_prompts(self, since=None, limit: int = 0, after_sequence: int = 0) -> Iterator[dict]:
        """Rows in the trainer's prompts format ({"prompt"}) plus the proto's {"prompt_id","text","source"}."""
        for r in self._paged("SELECT x.*, x.rowid AS rid FROM prompts x", to_us(since), limit, after_sequence):
            yield {"sequence": r["rid"], "prompt_id": r["id"], "prompt": r["text"], "text": r["text"],
                   "source": r["source"], "created_at": rfc3339(r["created_us"])}

    @staticmethod
    def _check_export(kind: str, limit: int = 0, after_sequence: int = 0) -> None:
        if kind not in EXPORT_KINDS:
            raise _invalid("kind", f"must be one of {list(EXPORT_KINDS)}, got {kind!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise _invalid("limit", f"must be >= 0, got {limit}")
        if isinstance(after_sequence, bool) or not isinstance(after_sequence, int) or after_sequence < 0:
            raise _invalid("after_sequence", f"must be >= 0, got {after_sequence}")

    def export(self, kind: str, since=None, limit: int = 0, after_sequence: int = 0) -> Iterator[dict]:
        """Records of ``kind`` stored after sequence ``after_sequence`` (0 = from the first), in order;
        each row carries its ``sequence`` — the last one is the cursor to continue from."""
        self._check_export(kind, limit, after_sequence)
        return getattr(self, f"export_{kind}")(since, limit, after_sequence)

    def sequence(self, kind: str) -> int:
        """The newest record's sequence (0 = none yet): ``export(kind, after_sequence=this)`` returns only
        what is stored from now on."""
        self._check_export(kind)
        return int(self._read(f"SELECT COALESCE(MAX(rowid), 0) FROM {_TABLE.get(kind, kind)}")[0][0])

    def wait_for_new(self, kind: str, after_sequence: int, timeout_s: float,
                     stop: Callable[[], bool] | None = None) -> bool:
        """Blocks until a record of ``kind`` with sequence > ``after_sequence`` exists (True), or until
        ``timeout_s`` (at most ``MAX_WAIT_S``) passes, ``stop()`` turns true or the store closes (False).
        A commit in this process wakes the waiter at once; one by another process sharing the file is
        seen within ``_RECHECK_S``."""
        self._check_export(kind, 0, after_sequence)
        deadline = time.monotonic() + min(max(0.0, float(timeout_s)), MAX_WAIT_S)
        with self._changed:
            while True:
                if self._closed:
                    return False
                if self._db.execute(f"SELECT 1 FROM {_TABLE.get(kind, kind)} WHERE rowid > ? LIMIT 1",
                                    (after_sequence,)).fetchone():
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop()):
                    return False
                self._changed.wait(min(left, _RECHECK_S))

    def stats(self) -> dict:
        """Counts; ``leased_tasks``: open tasks a labeler holds right now; ``active_labelers``: labelers who
        hold a lease or stored anything in the last :data:`ACTIVE_WINDOW_S` seconds."""
        now = self._now()
        since = now - int(ACTIVE_WINDOW_S * 1e6)
        with self._lock:
            q = lambda sql, *a: self._db.execute(sql, a).fetchone()[0]  # noqa: E731
            return {"prompts": q("SELECT COUNT(*) FROM prompts"),
                    "open_tasks": q("SELECT COUNT(*) FROM tasks WHERE n_rankings < MAX(needed, ?)",
                                    self.rankings_per_task),
                    "leased_tasks": q("SELECT COUNT(*) FROM tasks WHERE n_rankings < MAX(needed, ?) AND "
                                      "lease_labeler IS NOT NULL AND lease_expires_us > ?",
                                      self.rankings_per_task, now),
                    "active_labelers": q("SELECT COUNT(*) FROM (SELECT labeler_id FROM rankings WHERE created_us >= ? "
                                         "UNION SELECT labeler_id FROM skips WHERE created_us >= ? "
                                         "UNION SELECT labeler_id FROM demonstrations WHERE created_us >= ? "
                                         "UNION SELECT lease_labeler FROM tasks WHERE lease_labeler IS NOT NULL "
                                         "AND lease_expires_us > ?)", since, since, since, now),
                    "skips": q("SELECT COUNT(*) FROM skips"),
                    "tasks": q("SELECT COUNT(*) FROM tasks"),
                    "rankings": q("SELECT COUNT(*) FROM rankings"),
                    "demonstrations": q("SELECT COUNT(*) FROM demonstrations"),
                    "rankings_sequence": q("SELECT COALESCE(MAX(rowid), 0) FROM rankings")}

    def agreement(self) -> dict:
        """Agreement between labelers over every task ranked by two or more of them (services/core/
        agreement.py): {"overall": {"compared","pairwise","kendall_tau"}, "labelers": {id: the same}}.
        Recomputed only when a ranking was stored since the last call."""

        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM rankings").fetchone()[0]
            if self._agreement_cache is not None and self._agreement_cache[0] == seq:
                return self._agreement_cache[1]
            rows = self._db.execute("SELECT r.task_id, r.labeler_id, r.ranking, r.tied_with_next FROM rankings r "
                                    "JOIN tasks t ON t.id = r.task_id WHERE t.n_rankings >= 2 "
                                    "ORDER BY r.rowid").fetchall()
        overall, per = agreement.summarize(
            (r["task_id"], r["labeler_id"], agreement.tiers(json.loads(r["ranking"]),
                                                             json.loads(r["tied_with_next"] or "null")))
            for r in rows)
        out = {"overall": overall.as_dict(), "labelers": {k: v.as_dict() for k, v in per.items()}}
        with self._lock:
            self._agreement_cache = (seq, out)
        return out

    def labeler_stats(self, labeler_id: str) -> dict:
        """One labeler's own counts and agreement with the others (what the labeling app shows them)."""
        _nonempty(labeler_id, "labeler_id")
        with self._lock:
            q = lambda sql: self._db.execute(sql, (labeler_id,)).fetchone()[0]  # noqa: E731
            counts = {"rankings": q("SELECT COUNT(*) FROM rankings WHERE labeler_id=?"),
                      "skips": q("SELECT COUNT(*) FROM skips WHERE labeler_id=?"),
                      "demonstrations": q("SELECT COUNT(*) FROM demonstrations WHERE labeler_id=?")}
        none = {"compared": 0, "pairwise": 0.0, "kendall_tau": 0.0}
        return {"labeler_id": labeler_id, **counts,
                "agreement": self.agreement()["labelers"].get(labeler_id, none)}
