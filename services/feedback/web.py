"""The labeling page: one HTML page + a small JSON API over the same :class:`FeedbackStore`.

Stdlib ``http.server`` on a loopback port by default (``web_port`` in the feedback config; off unless
set). A person enters a labeler id, gets the next task (leased to them, as ``NextTask``), drags the
responses into order (best on top) and submits. Each shown task gets one client-side submission id, so
a retried submit never stores the ranking twice.

API (JSON):
- ``GET  /api/next?labeler_id=ID`` → ``{"task": {...} | null, "remaining": n}`` (leases the task: NextTask)
- ``POST /api/rankings`` ``{"submission_id","task_id","labeler_id","ranking"}`` →
  ``{"ranking_id","duplicate","pairs"}`` (SubmitRanking)
- ``GET  /api/stats`` → the store's counts (GetStats: open, a few COUNT queries)
Each endpoint is the RPC it names, with that RPC's role and request-size limit from
:data:`chatrl.services.runtime.roles.METHODS` (``Authorization: Bearer <labeler or operator token>``).
Errors: ``{"error": message}`` with 400 (invalid, naming the field) / 401 (no valid credential) / 403 (a
credential of the wrong role, a foreign Origin, an unexpected Host) / 404 / 409 (conflict) / 413 / 415
(not JSON) / 503 (every handler thread busy).

Browser-facing defences: a POST must be ``application/json`` (a cross-site form cannot send that without
a CORS preflight, which is never granted) and, when it carries an ``Origin``, come from this page's
origin; on a loopback bind the ``Host`` must be a loopback name (a DNS-rebinding page cannot reach the
labeler's local server under its own name), elsewhere one of ``allowed_hosts`` when given. Sockets time
out after ``SOCKET_TIMEOUT_S``, and at most ``max_threads`` requests are handled at once.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from chatrl.services.core.feedback_store import FeedbackStore, StoreError
from chatrl.services.runtime import roles
from chatrl.services.runtime.errors import ServiceError, http_status

log = logging.getLogger("chatrl.feedback.web")

SOCKET_TIMEOUT_S = 30.0  # a client that sends nothing for this long is dropped (it held a thread)
_RPC = "chatrl.v1.FeedbackService/"
# (HTTP method, path) → the RPC it is: its role and size limit come from the one table
ROUTES = {("GET", "/api/next"): _RPC + "NextTask", ("POST", "/api/rankings"): _RPC + "SubmitRanking",
          ("GET", "/api/stats"): _RPC + "GetStats"}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chatrl · rank responses</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
 header{display:flex;gap:.5rem;align-items:center;flex-wrap:wrap}
 input{padding:.3rem .5rem} button{padding:.35rem .8rem;cursor:pointer}
 #prompt{background:#f3f5f8;border-radius:6px;padding:.7rem 1rem;white-space:pre-wrap}
 ol{padding-left:1.6rem} li{border:1px solid #ccd;border-radius:6px;margin:.4rem 0;padding:.5rem .7rem;
 background:#fff;cursor:grab;white-space:pre-wrap;display:flex;gap:.6rem;align-items:flex-start}
 li.dragging{opacity:.4} li .txt{flex:1} li .unfinished{color:#a60;font-size:.8em}
 li .mv{display:flex;flex-direction:column} li .mv button{padding:0 .4rem;font-size:.8em}
 #msg{margin:.6rem 0;min-height:1.2em} .err{color:#b00} .ok{color:#070} small{color:#666}
</style></head><body>
<h1>Rank the responses</h1>
<header>
 <label>Labeler id <input id="labeler" autocomplete="username"></label>
 <label>Token <input id="token" type="password" placeholder="if the service needs one"></label>
 <button id="next">Next task</button> <small id="stats"></small>
</header>
<div id="msg"></div>
<section id="task" hidden>
 <h2>Prompt</h2><div id="prompt"></div>
 <h2>Responses <small>— drag (or use ▲▼) so the best is on top</small></h2>
 <ol id="list"></ol>
 <button id="submit">Submit ranking</button> <small id="meta"></small>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let task = null, submissionId = null;
$("labeler").value = localStorage.getItem("chatrl.labeler") || "";
$("token").value = sessionStorage.getItem("chatrl.token") || "";
function say(text, cls) { $("msg").textContent = text; $("msg").className = cls || ""; }
function uuid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "s-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
}
async function api(path, body) {
  const headers = {"Content-Type": "application/json"};
  const tok = $("token").value.trim();
  if (tok) headers["Authorization"] = "Bearer " + tok;
  const r = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
async function stats() {
  try { const s = await api("/api/stats");
        $("stats").textContent = `${s.open_tasks} open · ${s.rankings} rankings stored`; } catch (e) {}
}
function render() {
  $("prompt").textContent = task.prompt;
  const list = $("list"); list.replaceChildren();
  task.responses.forEach((text, i) => {
    const li = document.createElement("li"); li.draggable = true; li.dataset.index = i;
    const mv = document.createElement("span"); mv.className = "mv";
    for (const [label, dir] of [["▲", -1], ["▼", 1]]) {
      const b = document.createElement("button"); b.textContent = label; b.type = "button";
      b.onclick = () => { const sib = dir < 0 ? li.previousElementSibling : li.nextElementSibling;
                          if (sib) list.insertBefore(li, dir < 0 ? sib : sib.nextElementSibling); };
      mv.append(b);
    }
    const t = document.createElement("span"); t.className = "txt"; t.textContent = text || "(empty)";
    li.append(mv, t);
    if (task.finished && !task.finished[i]) {
      const u = document.createElement("span"); u.className = "unfinished"; u.textContent = "cut off"; li.append(u);
    }
    li.addEventListener("dragstart", () => li.classList.add("dragging"));
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    list.append(li);
  });
  $("meta").textContent = `task ${task.task_id} · policy v${task.policy_model_version}`;
  $("task").hidden = false;
}
$("list").addEventListener("dragover", (e) => {
  e.preventDefault();
  const dragging = document.querySelector("li.dragging"); if (!dragging) return;
  const after = [...$("list").querySelectorAll("li:not(.dragging)")].find(
    (el) => e.clientY < el.getBoundingClientRect().top + el.offsetHeight / 2);
  $("list").insertBefore(dragging, after || null);
});
async function next() {
  const who = $("labeler").value.trim();
  if (!who) { say("Enter a labeler id first.", "err"); return; }
  localStorage.setItem("chatrl.labeler", who); sessionStorage.setItem("chatrl.token", $("token").value);
  try {
    const r = await api("/api/next?labeler_id=" + encodeURIComponent(who));
    task = r.task; submissionId = uuid();
    if (!task) { $("task").hidden = true; say("No open tasks for you right now.", "ok"); }
    else { render(); say(`${r.remaining} more after this one.`); }
  } catch (e) { say(e.message, "err"); }
  stats();
}
async function submit() {
  const ranking = [...$("list").children].map((li) => Number(li.dataset.index));
  $("submit").disabled = true;
  try {
    const r = await api("/api/rankings", {submission_id: submissionId, task_id: task.task_id,
                                          labeler_id: $("labeler").value.trim(), ranking});
    say(`Saved (${r.pairs} preference pairs${r.duplicate ? ", already saved before" : ""}).`, "ok");
    await next();
  } catch (e) { say(e.message, "err"); }
  finally { $("submit").disabled = false; }
}
$("next").onclick = next; $("submit").onclick = submit; stats();
</script></body></html>
"""


def task_json(t: dict) -> dict:
    return {"task_id": t["task_id"], "prompt_id": t["prompt_id"], "prompt": t["prompt"],
            "responses": t["responses"], "finished": t["finished"],
            "policy_model_version": t["policy_model_version"], "created_us": t["created_us"],
            "lease_expires_us": t["lease_expires_us"]}


class _Handler(BaseHTTPRequestHandler):
    server_version = "chatrl-feedback"
    timeout = SOCKET_TIMEOUT_S  # applied to the connection's socket by StreamRequestHandler
    web: LabelingWeb  # set on the subclass

    def log_message(self, fmt, *args) -> None:  # route through logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _guard(self, fn) -> None:
        try:
            fn()
        except StoreError as e:
            self._json(http_status(e.kind), {"error": e.message, "field": e.field})
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
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/next":  # leases a task: a write, so it needs the labeler role like submitting
            if not self._authorized("GET", url.path):
                return
            labeler = parse_qs(url.query).get("labeler_id", [""])[0]
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
        """True, or answers 401/403 and returns False: the endpoint's RPC decides the role it needs."""
        try:
            self.web.auth.authorize(ROUTES[(verb, path)], self.headers.get("Authorization", ""))
        except ServiceError as e:
            status = 403 if e.code.name == "PERMISSION_DENIED" else http_status("unauthenticated")
            self._json(status, {"error": e.message + (" (enter the token)" if status == 401 else "")})
            return False
        return True

    def _post(self) -> None:
        url = urlparse(self.path)
        if url.path != "/api/rankings":
            self._json(404, {"error": f"no such endpoint {url.path}"})
            return
        if not self._authorized("POST", url.path):
            return
        limit = roles.rule(ROUTES[("POST", url.path)]).max_request_bytes
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= limit:
            self._json(413 if n > limit else 400, {"error": f"body must be 1..{limit} bytes of JSON"})
            return
        try:
            body = json.loads(self.rfile.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(400, {"error": "body: invalid JSON"})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": "body: must be a JSON object"})
            return
        ranking = body.get("ranking")
        if not isinstance(ranking, list):
            raise StoreError("invalid", "ranking", "must be a list of integers")
        args = {k: body.get(k) for k in ("submission_id", "task_id", "labeler_id")}
        for k, v in args.items():
            if not isinstance(v, str):
                raise StoreError("invalid", k, "must be a string")
        rid, dup, pairs = self.web.store.submit_ranking(args["submission_id"], args["task_id"],
                                                        args["labeler_id"], ranking)
        if self.web.metrics is not None:
            self.web.metrics.submitted("ranking", dup)
        self._json(200, {"ranking_id": rid, "duplicate": dup, "pairs": pairs})


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
    """The page's HTTP server, in a background thread; ``port`` is the bound port (after ``start``).
    ``auth``: the feedback server's credentials (roles.Credentials); ``allowed_hosts``: Host names the page
    answers to (empty: loopback names on a loopback bind, anything elsewhere). Refuses (before binding) a
    non-loopback ``host`` without an operator credential unless ``allow_insecure``."""

    def __init__(self, store: FeedbackStore, host: str = "127.0.0.1", port: int = 0,
                 auth: roles.Credentials | None = None, metrics=None, allowed_hosts: list[str] | None = None,
                 max_threads: int = 32, allow_insecure: bool = False) -> None:
        self.auth = auth or roles.Credentials()
        roles.check_exposure("feedback web page", [host], self.auth, allow_insecure)
        self.store, self.metrics = store, metrics
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
