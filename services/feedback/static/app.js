// chatrl labeling app: Compare (rate, flag, rank with ties, skip), Write (demonstrations), Chat then compare.
// No dependencies. Every call goes to this page's own origin with the labeler's bearer token.
"use strict";
const $ = (id) => document.getElementById(id);
const FLAGS = [["fails_instruction", "i", "fails to follow the instruction"], ["made_up_facts", "m", "made-up facts"],
               ["harmful", "h", "harmful or inappropriate"], ["unfinished", "u", "unfinished"]];
let task = null, submissionId = null, chatReturn = null;  // chatReturn: the chat turn a task came from
let chat = [];  // the live conversation: [{role, content, finished}]

$("labeler").value = localStorage.getItem("chatrl.labeler") || "";
$("token").value = sessionStorage.getItem("chatrl.token") || "";

function say(text, cls) { $("msg").textContent = text; $("msg").className = cls || ""; }
function who() { return $("labeler").value.trim(); }
function uuid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "s-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
}
function headers() {
  const h = {"Content-Type": "application/json"};
  const tok = $("token").value.trim();
  if (tok) h["Authorization"] = "Bearer " + tok;
  return h;
}
async function api(path, body) {
  const init = body === undefined ? {headers: headers()} : {method: "POST", headers: headers(), body: JSON.stringify(body)};
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

// -- sign in and own stats ------------------------------------------------------------------------
async function refreshMe() {
  const me = await api("/api/me?labeler_id=" + encodeURIComponent(who()));
  $("labeler").value = me.labeler_id;  // a personal credential names its labeler: the id may be left empty
  const a = me.agreement;
  $("me").textContent = `${me.labeler_id}: ${me.rankings} rankings · ${me.skips} skips · ${me.demonstrations} ` +
    `demonstrations` + (a.compared ? ` · agreement ${(100 * a.pairwise).toFixed(0)}% (τ ${a.kendall_tau.toFixed(2)}, ` +
    `${a.compared} shared tasks)` : "");
}
$("signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem("chatrl.token", $("token").value);
  try { await refreshMe(); localStorage.setItem("chatrl.labeler", who()); $("tabs").hidden = false; show("compare"); say("Signed in.", "ok"); }
  catch (err) { $("tabs").hidden = true; hideViews(); say(err.message, "err"); }
});
function hideViews() { document.querySelectorAll(".view").forEach((v) => { v.hidden = true; }); }
function show(view) {
  hideViews(); $("view-" + view).hidden = false;
  document.querySelectorAll("#tabs button").forEach((b) => b.setAttribute("aria-selected", b.dataset.view === view));
}
document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => show(b.dataset.view); });

// -- a conversation, read-only --------------------------------------------------------------------
function turnEl(m) {
  const d = document.createElement("div"); d.className = "turn " + m.role;
  const r = document.createElement("span"); r.className = "role"; r.textContent = m.role;
  const t = document.createElement("span"); t.className = "content"; t.textContent = m.content;
  d.append(r, t); return d;
}

// -- Compare --------------------------------------------------------------------------------------
function items() { return [...$("list").children]; }
function renderTask() {
  $("prompt").replaceChildren(...task.messages.map(turnEl));
  const list = $("list"); list.replaceChildren();
  task.responses.forEach((text, i) => {
    const li = document.createElement("li"); li.className = "resp"; li.draggable = true; li.tabIndex = 0;
    li.dataset.index = i;
    const t = document.createElement("span"); t.className = "txt"; t.textContent = text || "(empty)";
    const c = document.createElement("span"); c.className = "controls";
    const rate = document.createElement("select"); rate.className = "rating"; rate.tabIndex = -1;
    rate.setAttribute("aria-label", "quality 1-7");
    for (let v = 0; v <= 7; v++) { const o = document.createElement("option"); o.value = v; o.textContent = v ? `${v}/7` : "rate…"; rate.append(o); }
    c.append(rate);
    for (const [name, key, label] of FLAGS) {
      const l = document.createElement("label");
      const cb = document.createElement("input"); cb.type = "checkbox"; cb.className = "flag"; cb.dataset.flag = name; cb.tabIndex = -1;
      l.append(cb, ` ${label} (${key})`); c.append(l);
    }
    const tl = document.createElement("label");
    const tie = document.createElement("input"); tie.type = "checkbox"; tie.className = "tie"; tie.tabIndex = -1;
    tie.onchange = markTies;
    tl.append(tie, " tied with the next (t)"); c.append(tl);
    li.append(t, c);
    if (task.finished && !task.finished[i]) {
      const u = document.createElement("span"); u.className = "cutoff"; u.textContent = "cut off at the length limit"; li.append(u);
    }
    li.addEventListener("dragstart", () => li.classList.add("dragging"));
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); markTies(); });
    list.append(li);
  });
  markTies();
  $("meta").textContent = `task ${task.task_id} · policy v${task.policy_model_version}`;
  $("task").hidden = false;
  list.firstElementChild.focus();
}
function markTies() {
  const li = items();
  li.forEach((el, pos) => {
    const last = pos === li.length - 1, tie = el.querySelector(".tie");
    if (last) tie.checked = false;
    tie.disabled = last; el.classList.toggle("tied", tie.checked);
  });
}
$("list").addEventListener("dragover", (e) => {
  e.preventDefault();
  const dragging = document.querySelector("li.dragging"); if (!dragging) return;
  const after = items().filter((el) => el !== dragging).find(
    (el) => e.clientY < el.getBoundingClientRect().top + el.offsetHeight / 2);
  $("list").insertBefore(dragging, after || null);
});
$("list").addEventListener("keydown", (e) => {
  const li = e.target.closest("li.resp"); if (!li || e.target !== li) return;
  const k = e.key;
  if (k === "ArrowUp" || k === "ArrowDown") {  // move the focused response in the ranking
    const sib = k === "ArrowUp" ? li.previousElementSibling : li.nextElementSibling;
    if (sib) $("list").insertBefore(li, k === "ArrowUp" ? sib : sib.nextElementSibling);
    li.focus(); markTies();
  } else if (k === "j" || k === "k") {  // move the focus
    const sib = k === "j" ? li.nextElementSibling : li.previousElementSibling; if (sib) sib.focus();
  } else if (k >= "1" && k <= "7") {
    li.querySelector(".rating").value = k;
  } else if (k === "0") {
    li.querySelector(".rating").value = "0";
  } else if (k === "t") {
    const tie = li.querySelector(".tie"); if (!tie.disabled) { tie.checked = !tie.checked; markTies(); }
  } else {
    const f = FLAGS.find(([, key]) => key === k); if (!f) return;
    const cb = li.querySelector(`.flag[data-flag="${f[0]}"]`); cb.checked = !cb.checked;
  }
  e.preventDefault();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && task && !$("view-compare").hidden) { e.preventDefault(); submit(); }
});
async function next(done = "") {  // done: what was just saved, kept in front of the next message
  if (!who()) { say("Sign in first.", "err"); return; }
  try {
    const r = await api("/api/next?labeler_id=" + encodeURIComponent(who()));
    setTask(r.task);
    say(done + (task ? `${r.remaining} more after this one.` : "No open tasks for you right now."), "ok");
  } catch (e) { say(e.message, "err"); }
}
function setTask(t) {
  task = t; submissionId = uuid();
  if (task) renderTask(); else $("task").hidden = true;
}
async function submit() {
  const li = items();
  const ranking = li.map((el) => Number(el.dataset.index));
  const tied_with_next = li.slice(0, -1).map((el) => el.querySelector(".tie").checked);
  const byIndex = [...li].sort((a, b) => a.dataset.index - b.dataset.index);
  const assessments = byIndex.map((el) => ({
    rating: Number(el.querySelector(".rating").value),
    flags: [...el.querySelectorAll(".flag")].filter((cb) => cb.checked).map((cb) => cb.dataset.flag)}));
  $("submit").disabled = true;
  try {
    const r = await api("/api/rankings", {submission_id: submissionId, task_id: task.task_id, labeler_id: who(),
                                          ranking, tied_with_next, assessments});
    const saved = `Saved (${r.pairs} preference pairs${r.duplicate ? ", already saved before" : ""}). `;
    say(saved, "ok");
    refreshMe().catch(() => {});
    if (chatReturn !== null) { backToChat(task.responses[ranking[0]], task.finished[ranking[0]]); return; }
    await next(saved);
  } catch (e) { say(e.message, "err"); }
  finally { $("submit").disabled = false; }
}
async function skip() {
  let reason = $("skip-reason").value;
  if (reason === "other") reason = $("skip-other").value.trim();
  if (!reason) { say("Say why you skip.", "err"); return; }
  try {
    await api("/api/skips", {submission_id: submissionId, task_id: task.task_id, labeler_id: who(), reason});
    say("Skipped. ", "ok");
    if (chatReturn !== null) { backToChat(null); return; }
    await next("Skipped. ");
  } catch (e) { say(e.message, "err"); }
}
$("next").onclick = () => next(); $("submit").onclick = submit; $("skip").onclick = skip;

// -- Write ----------------------------------------------------------------------------------------
function addTurn(role, content) {
  const row = document.createElement("div"); row.className = "turnedit";
  const sel = document.createElement("select"); sel.className = "turn-role";
  for (const r of ["user", "assistant", "system"]) { const o = document.createElement("option"); o.value = o.textContent = r; sel.append(o); }
  sel.value = role;
  const ta = document.createElement("textarea"); ta.className = "turn-content"; ta.value = content || "";
  ta.setAttribute("aria-label", role + " turn");
  const rm = document.createElement("button"); rm.type = "button"; rm.textContent = "✕"; rm.title = "remove turn";
  rm.onclick = () => row.remove();
  row.append(sel, ta, rm); $("turns").append(row); ta.focus(); return ta;
}
function writtenTurns() {
  return [...$("turns").children].map((row) => ({role: row.querySelector(".turn-role").value,
                                                 content: row.querySelector(".turn-content").value}));
}
function resetWrite() { $("turns").replaceChildren(); addTurn("user"); addTurn("assistant"); $("turns").querySelector("textarea").focus(); }
$("add-user").onclick = () => addTurn("user");
$("add-assistant").onclick = () => addTurn("assistant");
$("sample-reply").onclick = async () => {  // edit a sampled reply: the policy answers the turns so far
  const msgs = writtenTurns().filter((m) => m.content.trim());
  if (!msgs.length || msgs[msgs.length - 1].role !== "user") { say("Sampling needs a last user turn with text.", "err"); return; }
  const ta = addTurn("assistant");
  try { await streamReply(msgs, (text) => { ta.value = text; }); } catch (e) { say(e.message, "err"); }
};
$("submit-demo").onclick = async () => {
  try {
    const r = await api("/api/demonstrations", {submission_id: uuid(), labeler_id: who(), messages: writtenTurns()});
    say(`Demonstration saved (${r.demonstration_id}).`, "ok"); resetWrite(); refreshMe().catch(() => {});
  } catch (e) { say(e.message, "err"); }
};
resetWrite();

// -- Chat, then compare ---------------------------------------------------------------------------
async function streamReply(messages, onText) {  // POST /api/chat answers NDJSON lines: {"delta"} … {"end"}
  const r = await fetch("/api/chat", {method: "POST", headers: headers(), body: JSON.stringify({labeler_id: who(), messages})});
  if (!r.ok) { const d = await r.json().catch(() => ({error: r.statusText})); throw new Error(d.error || r.statusText); }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", text = "", end = null;
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl); buf = buf.slice(nl + 1); if (!line.trim()) continue;
      const ev = JSON.parse(line);
      if (ev.error) throw new Error(ev.error);
      if (ev.delta !== undefined) { text += ev.delta; onText(text); }
      if (ev.end) { end = ev.end; text = end.text; onText(text); }
    }
  }
  if (!end) throw new Error("the reply stream ended early");
  return end;
}
function renderChat() {
  $("chat-log").replaceChildren(...chat.map((m, i) => {
    const el = turnEl(m);
    if (m.role === "assistant" && !m.pending) {
      const b = document.createElement("button"); b.type = "button"; b.className = "alternatives";
      b.textContent = "Alternatives…"; b.onclick = () => alternatives(i); el.append(b);
    }
    return el;
  }));
}
$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("chat-input").value; if (!text.trim()) return;
  $("chat-input").value = ""; chat.push({role: "user", content: text});
  const reply = {role: "assistant", content: "", pending: true}; chat.push(reply); renderChat();
  const contentEl = () => $("chat-log").lastElementChild.querySelector(".content");
  try {
    const end = await streamReply(chat.slice(0, -1).map(({role, content}) => ({role, content})),
                                  (t) => { reply.content = t; contentEl().textContent = t; });
    reply.finished = end.finished; reply.pending = false; renderChat(); say("", "");
  } catch (err) { chat.splice(-2); renderChat(); say(err.message, "err"); }
  $("chat-input").focus();
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-reset").onclick = () => { chat = []; renderChat(); $("chat-input").focus(); };
async function alternatives(i) {  // the history up to this assistant turn becomes the comparison's prompt
  const history = chat.slice(0, i).map(({role, content}) => ({role, content}));
  try {
    say("Sampling alternatives…");
    const r = await api("/api/alternatives", {labeler_id: who(), messages: history, reply: chat[i].content,
                                              finished: chat[i].finished !== false});
    chatReturn = i; show("compare"); setTask(r.task); say("Rank the replies; the best continues the chat.");
  } catch (e) { say(e.message, "err"); }
}
function backToChat(best, finished) {  // the best-ranked reply continues the conversation; later turns go
  const i = chatReturn; chatReturn = null; setTask(null);
  if (best !== null && best !== undefined) { chat = chat.slice(0, i); chat.push({role: "assistant", content: best, finished}); }
  show("chat"); renderChat(); $("chat-input").focus();
}
