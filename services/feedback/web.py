"""The labeling page: one HTML page + a small JSON API over the same :class:`FeedbackStore`.

Stdlib ``http.server`` on a loopback port by default (``web_port`` in the feedback config; off unless
set). A person enters a labeler id, gets the next task (leased to them, as ``NextTask``), drags the
responses into order (best on top) and submits. Each shown task gets one client-side submission id, so
a retried submit never stores the ranking twice.

API (JSON):
- ``GET  /api/next?labeler_id=ID`` → ``{"task": {...} | null, "remaining": n}`` (leases the task; needs the token)
- ``POST /api/rankings`` ``{"submission_id","task_id","labeler_id","ranking"}`` →
  ``{"ranking_id","duplicate","pairs"}``; needs ``Authorization: Bearer <token>`` when the service has one
- ``GET  /api/stats`` → the store's counts
Errors: ``{"error": message}`` with 400 (invalid, naming the field) / 401 / 404 / 409 (conflict).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from chatrl.services.core.feedback_store import FeedbackStore, StoreError

log = logging.getLogger("chatrl.feedback.web")

MAX_BODY = 1 << 20
_HTTP = {"invalid": 400, "not_found": 404, "conflict": 409, "unavailable": 503}

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
            self._json(_HTTP.get(e.kind, 500), {"error": e.message, "field": e.field})
        except Exception:
            log.exception("labeling page: unhandled error on %s %s", self.command, self.path)
            self._json(500, {"error": "internal error (see server log)"})

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _get(self) -> None:
        url = urlparse(self.path)
        store = self.web.store
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/next":  # leases a task: a write, so it needs the token like submitting
            if not self._authorized():
                return
            labeler = parse_qs(url.query).get("labeler_id", [""])[0]
            task, remaining = store.next_task(labeler)
            self._json(200, {"task": task_json(task) if task else None, "remaining": remaining})
        elif url.path == "/api/stats":
            self._json(200, store.stats())
        elif url.path == "/healthz":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": f"no such page {url.path}"})

    def _authorized(self) -> bool:
        """True, or answers 401 and returns False, when the service has a token and the request lacks it."""
        tok = self.web.token
        if tok and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                           f"Bearer {tok}".encode()):
            self._json(401, {"error": "leasing and submitting tasks need 'Authorization: Bearer <token>' "
                                      "(enter the token)"})
            return False
        return True

    def _post(self) -> None:
        url = urlparse(self.path)
        if url.path != "/api/rankings":
            self._json(404, {"error": f"no such endpoint {url.path}"})
            return
        if not self._authorized():
            return
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 < n <= MAX_BODY:
            self._json(413 if n > MAX_BODY else 400, {"error": f"body must be 1..{MAX_BODY} bytes of JSON"})
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


class LabelingWeb:
    """The page's HTTP server, in a background thread; ``port`` is the bound port (after ``start``)."""

    def __init__(self, store: FeedbackStore, host: str = "127.0.0.1", port: int = 0, token: str = "",
                 metrics=None) -> None:
        self.store, self.token, self.metrics = store, token, metrics
        handler = type("Handler", (_Handler,), {"web": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
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
