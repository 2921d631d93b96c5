"""The labeling app: a page (``static/``: html, js, css — no browser dependencies) and a JSON API over the
same :class:`FeedbackStore` and policy-inference as the gRPC service.

Stdlib ``http.server`` on a loopback port by default (``web_port`` in the feedback config; off unless
set). A labeler signs in with their id and the labeler credential, then:

- *Compare*: the next task (leased to them, as ``NextTask``): the prompt (a conversation) and K responses;
  a 1–7 rating and flags per response, a full ranking with ties, by keyboard or by dragging; or a skip
  with a reason.
- *Write*: a demonstration — they write both roles over several turns, or edit a reply sampled from the
  policy — stored as ``SubmitDemonstration`` (exported as chat ``messages`` JSONL for the next SFT).
- *Chat, then compare*: they talk with the live policy (streamed, multi-turn); at any assistant turn they
  ask for alternatives: the policy samples K − 1 more replies to the same history and a task whose prompt
  is that history is created and leased to them to rank.

API (JSON; ``Authorization: Bearer <labeler or operator credential>`` except ``/api/stats``):
- ``GET  /api/me?labeler_id=ID`` → that labeler's own counts and agreement (the sign-in check)
- ``GET  /api/next?labeler_id=ID`` → ``{"task": {...} | null, "remaining": n}`` (NextTask: leases it)
- ``POST /api/rankings`` ``{"submission_id","task_id","labeler_id","ranking","tied_with_next"?,"assessments"?}``
  → ``{"ranking_id","duplicate","pairs"}`` (SubmitRanking)
- ``POST /api/skips`` ``{"submission_id","task_id","labeler_id","reason"}`` → ``{"skip_id","duplicate"}`` (SkipTask)
- ``POST /api/demonstrations`` ``{"submission_id","labeler_id","messages"}`` → ``{"demonstration_id","duplicate"}``
- ``POST /api/chat`` ``{"labeler_id","messages"}`` (ends with a user turn) → NDJSON lines ``{"delta": text}``…
  then ``{"end": {"text","finished","model_version"}}`` (or ``{"error"}``), from policy ``GenerateStream``
- ``POST /api/alternatives`` ``{"labeler_id","messages","reply","finished"?}`` → ``{"task": {...}}``: the
  reply plus ``alternatives_k`` − 1 samples from policy ``Generate``, a task leased to the caller
- ``GET  /api/stats`` → the store's counts (GetStats without the per-labeler figures)
Each endpoint takes the role and request-size limit of the RPC it is (:data:`ROUTES`) from
:data:`chatrl.services.runtime.roles.METHODS`; chat and alternatives spend policy compute on a labeler's
behalf, so they are labeler calls with SubmitDemonstration's limit. Errors: ``{"error": message}`` with
400 (invalid, naming the field) / 401 (no valid credential) / 403 (a credential of the wrong role, a
foreign Origin, an unexpected Host) / 404 / 409 (conflict) / 413 / 415 (not JSON) / 503 (every handler
thread busy, or policy-inference unreachable).

Browser-facing defences: a POST must be ``application/json`` (a cross-site form cannot send that without
a CORS preflight, which is never granted) and, when it carries an ``Origin``, come from this page's
origin; on a loopback bind the ``Host`` must be a loopback name (a DNS-rebinding page cannot reach the
labeler's local server under its own name), elsewhere one of ``allowed_hosts`` when given. Sockets time
out after ``SOCKET_TIMEOUT_S``, and at most ``max_threads`` requests are handled at once. Only the three
files of ``static/`` are served (read once at start), with a Content-Security-Policy of 'self'.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from chatrl.services.core.feedback_store import MAX_ID_CHARS, FeedbackStore, StoreError, check_messages
from chatrl.services.runtime import roles
from chatrl.services.runtime.errors import ServiceError, http_status

log = logging.getLogger("chatrl.feedback.web")

SOCKET_TIMEOUT_S = 30.0  # a client that sends nothing for this long is dropped (it held a thread)
_RPC = "chatrl.v1.FeedbackService/"
# (HTTP method, path) → the RPC it is: its role and size limit come from the one table
ROUTES = {("GET", "/api/next"): _RPC + "NextTask", ("GET", "/api/me"): _RPC + "NextTask",
          ("POST", "/api/rankings"): _RPC + "SubmitRanking", ("POST", "/api/skips"): _RPC + "SkipTask",
          ("POST", "/api/demonstrations"): _RPC + "SubmitDemonstration",
          ("POST", "/api/chat"): _RPC + "SubmitDemonstration",
          ("POST", "/api/alternatives"): _RPC + "SubmitDemonstration",
          ("GET", "/api/stats"): _RPC + "GetStats"}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; frame-ancestors 'none'"


def load_static() -> dict[str, tuple[bytes, str]]:
    """URL path → (body, content type) of the app's files, read once (nothing else on disk is served)."""
    pages = {path: ((STATIC / name).read_bytes(), ctype) for path, (name, ctype) in _TYPES.items()}
    pages["/index.html"] = pages["/"]
    return pages


def task_json(t: dict) -> dict:
    return {"task_id": t["task_id"], "prompt_id": t["prompt_id"], "prompt": t["prompt"],
            "messages": t["messages"], "responses": t["responses"], "finished": t["finished"],
            "policy_model_version": t["policy_model_version"], "created_us": t["created_us"],
            "lease_expires_us": t["lease_expires_us"]}


def _strings(body: dict, *keys: str) -> list[str]:
    out = []
    for k in keys:
        v = body.get(k)
        if not isinstance(v, str):
            raise StoreError("invalid", k, "must be a string")
        out.append(v)
    return out


class _Handler(BaseHTTPRequestHandler):
    server_version = "chatrl-feedback"
    timeout = SOCKET_TIMEOUT_S  # applied to the connection's socket by StreamRequestHandler
    web: LabelingWeb  # set on the subclass

    def log_message(self, fmt, *args) -> None:  # route through logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _head(self, status: int, ctype: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self._head(status, ctype, len(body))
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _guard(self, fn) -> None:
        try:
            fn()
        except StoreError as e:
            self._json(http_status(e.kind), {"error": e.message, "field": e.field})
        except ServiceError as e:  # another labeler's id, or policy-inference refused or unreachable (chat)
            status = {"INVALID_ARGUMENT": 400, "PERMISSION_DENIED": 403}.get(e.code.name, 503)
            self._json(status, {"error": e.message})
        except Exception:
            log.exception("labeling page: unhandled error on %s %s", self.command, self.path)
            self._json(500, {"error": "internal error (see server log)"})

    def do_GET(self) -> None:
        if self._host_ok():
            self._guard(self._get)

    def do_POST(self) -> None:
        if self._host_ok() and self._origin_ok():
            self._guard(self._post)

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        allowed = self.web.allowed_hosts
        if allowed and name not in allowed:
            self._json(403, {"error": f"Host {host[:100]!r} is not one this page answers to"})
            return False
        return True

    def _origin_ok(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is not None and urlparse(origin).netloc != self.headers.get("Host", ""):
            self._json(403, {"error": "cross-origin requests are refused"})
            return False
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._json(415, {"error": "Content-Type must be application/json"})
            return False
        return True

    def _get(self) -> None:
        url = urlparse(self.path)
        store = self.web.store
        if url.path in self.web.pages:
            self._send(200, *self.web.pages[url.path])
        elif url.path in ("/api/next", "/api/me"):  # /api/next leases a task: a write, so it needs the labeler
            if not self._authorized("GET", url.path):
                return
            labeler = self._who(parse_qs(url.query).get("labeler_id", [""])[0])
            if url.path == "/api/me":
                self._json(200, store.labeler_stats(labeler))
                return
            task, remaining = store.next_task(labeler)
            self._json(200, {"task": task_json(task) if task else None, "remaining": remaining})
        elif url.path == "/api/stats":
            if self._authorized("GET", url.path):
                self._json(200, store.stats())
        elif url.path == "/healthz":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": f"no such page {url.path}"})

    def _authorized(self, verb: str, path: str) -> bool:
        """True, or answers 401/403 and returns False: the endpoint's RPC decides the role it needs. The
        caller is kept for :meth:`_who`."""
        try:
            self._caller = self.web.auth.authorize(ROUTES[(verb, path)], self.headers.get("Authorization", ""))
        except ServiceError as e:
            status = 403 if e.code.name == "PERMISSION_DENIED" else http_status("unauthenticated")
            self._json(status, {"error": e.message + (" (enter the token)" if status == 401 else "")})
            return False
        return True

    def _who(self, requested) -> str:
        """The labeler id this request labels under (a per-labeler credential's own; 403 for another's)."""
        if not isinstance(requested, str):
            raise StoreError("invalid", "labeler_id", "must be a string")
        return self.web.auth.labeler_id(self._caller, requested)

    def _body(self, path: str) -> dict | None:
        """The request's JSON object within the endpoint's size limit, or None after answering the error."""
        limit = roles.rule(ROUTES[("POST", path)]).max_request_bytes
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= limit:
            self._json(413 if n > limit else 400, {"error": f"body must be 1..{limit} bytes of JSON"})
            return None
        try:
            body = json.loads(self.rfile.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(400, {"error": "body: invalid JSON"})
            return None
        if not isinstance(body, dict):
            self._json(400, {"error": "body: must be a JSON object"})
            return None
        return body

    def _post(self) -> None:
        path = urlparse(self.path).path
        handler = {"/api/rankings": self._ranking, "/api/skips": self._skip,
                   "/api/demonstrations": self._demonstration, "/api/chat": self._chat,
                   "/api/alternatives": self._alternatives}.get(path)
        if handler is None:
            self._json(404, {"error": f"no such endpoint {path}"})
            return
        if not self._authorized("POST", path):
            return
        body = self._body(path)
        if body is not None:
            handler(body)

    def _submitted(self, kind: str, dup: bool) -> None:
        if self.web.metrics is not None:
            self.web.metrics.submitted(kind, dup)

    def _ranking(self, body: dict) -> None:
        ranking = body.get("ranking")
        if not isinstance(ranking, list):
            raise StoreError("invalid", "ranking", "must be a list of integers")
        sid, tid = _strings(body, "submission_id", "task_id")
        who = self._who(body.get("labeler_id", ""))
        rid, dup, pairs = self.web.store.submit_ranking(sid, tid, who, ranking, body.get("tied_with_next"),
                                                        body.get("assessments"))
        self._submitted("ranking", dup)
        self._json(200, {"ranking_id": rid, "duplicate": dup, "pairs": pairs})

    def _skip(self, body: dict) -> None:
        sid, tid, reason = _strings(body, "submission_id", "task_id", "reason")
        who = self._who(body.get("labeler_id", ""))
        skip_id, dup = self.web.store.skip_task(sid, tid, who, reason)
        self._submitted("skip", dup)
        self._json(200, {"skip_id": skip_id, "duplicate": dup})

    def _demonstration(self, body: dict) -> None:
        (sid,) = _strings(body, "submission_id")
        who = self._who(body.get("labeler_id", ""))
        did, dup = self.web.store.submit_demonstration(sid, who, body.get("messages"))
        self._submitted("demonstration", dup)
        self._json(200, {"demonstration_id": did, "duplicate": dup})

    def _policy(self):
        if self.web.policy is None:
            raise StoreError("unavailable", "", "this labeling page has no policy-inference to chat with")
        return self.web.policy

    def _conversation(self, body: dict) -> tuple[str, list[dict]]:
        """(labeler id, messages) of a chat request, checked before any sampling."""
        who = self._who(body.get("labeler_id", ""))
        if not who or len(who) > MAX_ID_CHARS:
            raise StoreError("invalid", "labeler_id", f"must be 1..{MAX_ID_CHARS} characters")
        return who, check_messages(body.get("messages"), "messages", last="user")

    def _chat(self, body: dict) -> None:
        """Streams the policy's reply as NDJSON lines over a connection that closes at the end (HTTP/1.0)."""
        (_, messages), policy = self._conversation(body), self._policy()
        stream = policy.stream(messages, self.web.chat_max_new_tokens)
        first = next(stream)  # errors before the first event still answer with a status code
        self._head(200, "application/x-ndjson; charset=utf-8", None)
        try:
            for event in (first, *stream):
                self.wfile.write(json.dumps(event, ensure_ascii=False).encode() + b"\n")
                self.wfile.flush()
        except ServiceError as e:  # after the headers: the error is the last line
            self.wfile.write(json.dumps({"error": e.message}).encode() + b"\n")
        self.close_connection = True

    def _alternatives(self, body: dict) -> None:
        (who, messages), policy = self._conversation(body), self._policy()
        (reply,) = _strings(body, "reply")
        finished = body.get("finished", True)
        if not isinstance(finished, bool):
            raise StoreError("invalid", "finished", "must be a boolean")
        store = self.web.store
        k = self.web.alternatives_k
        responses, fins, version = policy.sample([messages], k - 1, self.web.chat_max_new_tokens)
        (tid,) = store.create_tasks([{"messages": messages, "responses": [reply] + responses[0],
                                      "finished": [finished] + fins[0], "source": f"chat:{who}"[:256]}],
                                    policy_model_version=version, lease_to=who)
        self._json(200, {"task": task_json(store.get_task(tid))})


class _BoundedServer(ThreadingHTTPServer):
    """A thread per request, at most ``max_threads`` at once; beyond, a short 503 from the accept loop."""

    daemon_threads = True

    def __init__(self, addr, handler, max_threads: int) -> None:
        self._slots = threading.BoundedSemaphore(max_threads)
        super().__init__(addr, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class LabelingWeb:
    """The app's HTTP server, in a background thread; ``port`` is the bound port (after ``start``).
    ``auth``: the feedback server's credentials (roles.Credentials); ``allowed_hosts``: Host names the page
    answers to (empty: loopback names on a loopback bind, anything elsewhere). Refuses (before binding) a
    non-loopback ``host`` without an operator credential unless ``allow_insecure``. ``policy``: for chat
    and alternatives, an object with ``stream(messages, max_new_tokens)`` (yields ``{"delta"}`` … ``{"end"}``
    events) and ``sample(prompts, k, max_new_tokens)`` (→ responses, finished flags, model version), e.g.
    the service's ``PolicySampler``; None = no chat."""

    def __init__(self, store: FeedbackStore, host: str = "127.0.0.1", port: int = 0,
                 auth: roles.Credentials | None = None, metrics=None, allowed_hosts: list[str] | None = None,
                 max_threads: int = 32, allow_insecure: bool = False, policy=None,
                 chat_max_new_tokens: int = 128, alternatives_k: int = 4) -> None:
        self.auth = auth or roles.Credentials()
        roles.check_exposure("feedback web page", [host], self.auth, allow_insecure)
        if alternatives_k < 2:
            raise ValueError(f"alternatives_k must be >= 2, got {alternatives_k}")
        self.store, self.metrics, self.policy = store, metrics, policy
        self.chat_max_new_tokens, self.alternatives_k = int(chat_max_new_tokens), int(alternatives_k)
        self.pages = load_static()
        self.allowed_hosts = set(allowed_hosts or ()) or (_LOOPBACK_NAMES | {host} if roles.is_loopback(host)
                                                          else set())
        handler = type("Handler", (_Handler,), {"web": self})
        self.httpd = _BoundedServer((host, port), handler, max(1, max_threads))
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="feedback-web",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()
