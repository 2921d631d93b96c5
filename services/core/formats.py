"""Data formats read by the trainer, each validated with errors naming the file, line and field.

- text corpus: UTF-8 text; documents separated by a line that is exactly ``<|endoftext|>``
- SFT demonstrations (JSONL): ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``
  with at least one assistant message
- pairwise preferences (JSONL): ``{"prompt": str, "chosen": str, "rejected": str}``
- rankings (JSONL): ``{"prompt": str, "responses": [str × K], "ranking": [int × K]}`` — ``ranking`` lists
  response indices best-first (a permutation of 0..K-1, K ≥ 2); optional ``"finished": [bool × K]`` says
  whether each response ended its turn with the end token (default true); optional
  ``"tied_with_next": [bool × (K-1)]``: position i of ``ranking`` is tied with position i+1 (default no
  ties; a tied pair is no preference); optional ``"messages"``: the prompt as a conversation ending with a
  user turn (the feedback service's export writes it; ``prompt`` is then its plain-text rendering) — the
  K responses are candidate next assistant turns
- prompts: plain text, one prompt per line, or JSONL ``{"prompt": str}`` or ``{"messages": [...]}`` (a
  conversation ending with the user turn the model answers next; multi-turn prompts reach comparison
  tasks, the reward model and RL as conversations)

A *prompt* the models see (:data:`Prompt`) is a text (one user turn) or a conversation; tokenizers'
``prompt_ids`` render either with the chat template.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chatrl.services.core.checkpoint import atomic_write_text

DOC_SEP = "<|endoftext|>"
ROLES = ("system", "user", "assistant")


class FormatError(ValueError):
    pass


Prompt = str | list[dict]  # one user turn, or a conversation [{"role", "content"}, ...] ending with a user turn


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one text: a single user turn is its content, a conversation "User: …\n\nAssistant: …"
    (the feedback store's prompt-pool key, what a task's ``prompt`` shows and what the gold labeler reads)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


@dataclass
class Ranking:
    prompt: str  # the prompt's text (for a conversation: its plain-text rendering, e.g. for the gold labeler)
    responses: list[str]
    ranking: list[int]  # response indices, best first
    finished: list[bool] = field(default_factory=list)
    tied_with_next: list[bool] = field(default_factory=list)  # [K-1] by ranking position; empty = no ties
    messages: list[dict] | None = None  # a multi-turn prompt; None = the single user turn ``prompt``

    @property
    def chat(self) -> Prompt:
        """What the models are given: the conversation if there is one, else the text."""
        return self.messages if self.messages else self.prompt

    def pairs(self) -> list[tuple[int, int]]:
        """Every (preferred, rejected) pair of response indices the ranking implies, best first; responses
        tied with each other (one run of ``tied_with_next``) form no pair: tiers [[2, 0], [1]] → (2, 1), (0, 1)."""
        tier, tiers = 0, []
        for i in range(len(self.ranking)):
            tiers.append(tier)
            tier += not (i < len(self.tied_with_next) and self.tied_with_next[i])
        r = self.ranking
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r)) if tiers[i] != tiers[j]]

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "responses": self.responses, "ranking": self.ranking,
             "finished": self.finished or [True] * len(self.responses)}
        if any(self.tied_with_next):
            d["tied_with_next"] = self.tied_with_next
        if self.messages:
            d["messages"] = self.messages
        return d


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise FormatError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def _str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise FormatError(f"{where}: missing field '{key}'")
    v = obj[key]
    if not isinstance(v, str):
        raise FormatError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise FormatError(f"{where}: field '{key}' must not be empty")
    return v


def read_corpus(paths: Iterable[Path]) -> list[str]:
    docs: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FormatError(f"{p}: file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{p}: not UTF-8 text (byte {e.start})") from None
        cur: list[str] = []
        for line in text.splitlines(keepends=True):
            if line.strip() == DOC_SEP:
                if "".join(cur).strip():
                    docs.append("".join(cur).strip("\n"))
                cur = []
            else:
                cur.append(line)
        if "".join(cur).strip():
            docs.append("".join(cur).strip("\n"))
    return docs


def validate_messages(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise FormatError(f"{where}: messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise FormatError(f"{where}: messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        c = m.get("content")
        if not isinstance(c, str) or not c.strip():
            raise FormatError(f"{where}: messages[{i}].content must be a non-empty string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise FormatError(f"{where}: messages has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_sft(path: Path) -> list[list[dict]]:
    return [validate_messages(o.get("messages"), f"{path}:{n}") for n, o in _jsonl(path)]


def load_pairs(path: Path) -> list[dict]:
    """Pairwise preferences: {"prompt","chosen","rejected"}, optionally "messages" (the prompt as a
    conversation ending with a user turn) and "chosen_finished" / "rejected_finished" (default true) — what
    the feedback service's EXPORT_KIND_PAIRS writes."""
    out = []
    for n, o in _jsonl(path):
        w = f"{path}:{n}"
        prompt = _str(o, "prompt", w)
        fin = [o.get(f"{side}_finished", True) for side in ("chosen", "rejected")]
        if not all(isinstance(f, bool) for f in fin):
            raise FormatError(f"{w}: 'chosen_finished' and 'rejected_finished' must be booleans")
        out.append({"prompt": prompt, "chosen": _str(o, "chosen", w, True), "rejected": _str(o, "rejected", w, True),
                    "messages": conversation(o.get("messages"), prompt, w), "finished": fin})
    return out


def validate_ranking(k: int, ranking, where: str) -> list[int]:
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise FormatError(f"{where}: field 'ranking' must be a list of integers")
    if sorted(ranking) != list(range(k)):
        dup = sorted({r for r in ranking if ranking.count(r) > 1})
        missing = sorted(set(range(k)) - set(ranking))
        raise FormatError(f"{where}: field 'ranking' must be a permutation of 0..{k - 1} "
                          f"(duplicates {dup}, missing {missing})")
    return list(ranking)


def load_rankings(path: Path) -> list[Ranking]:
    out = []
    for n, o in _jsonl(path):
        w = f"{path}:{n}"
        prompt = _str(o, "prompt", w)
        resp = o.get("responses")
        if not isinstance(resp, list) or not all(isinstance(r, str) for r in resp):
            raise FormatError(f"{w}: field 'responses' must be a list of strings")
        if len(resp) < 2:
            raise FormatError(f"{w}: field 'responses' needs at least 2 responses (K >= 2), got {len(resp)}")
        ranking = validate_ranking(len(resp), o.get("ranking"), w)
        fin = o.get("finished", [True] * len(resp))
        if not isinstance(fin, list) or len(fin) != len(resp) or not all(isinstance(b, bool) for b in fin):
            raise FormatError(f"{w}: field 'finished' must be a list of {len(resp)} booleans")
        ties = o.get("tied_with_next") or []
        if not isinstance(ties, list) or (ties and len(ties) != len(resp) - 1) or \
                not all(isinstance(b, bool) for b in ties):
            raise FormatError(f"{w}: field 'tied_with_next' must be a list of {len(resp) - 1} booleans")
        out.append(Ranking(prompt, resp, ranking, fin, ties if any(ties) else [],
                           conversation(o.get("messages"), prompt, w)))
    return out


def conversation(msgs, prompt: str, where: str) -> list[dict] | None:
    """A ranking's optional ``messages`` checked (a conversation ending with a user turn); None when absent
    or when it is just the one user turn ``prompt`` (the export writes ``messages`` for every row)."""
    if msgs is None:
        return None
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) \
                or not m["content"].strip():
            raise FormatError(f"{where}: messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': "
                              f"a non-empty string}}")
    if msgs[-1]["role"] != "user":
        raise FormatError(f"{where}: messages must end with the user turn the responses answer, "
                          f"got {msgs[-1]['role']!r}")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return None if msgs == [{"role": "user", "content": prompt}] else msgs


def load_prompts(path: Path) -> list[Prompt]:
    """Prompts: texts, and (JSONL rows with ``messages``) conversations ending with a user turn — a
    conversation of that one user turn is its text."""
    path = Path(path)
    if path.suffix == ".jsonl":
        out: list[Prompt] = []
        for n, o in _jsonl(path):
            where = f"{path}:{n}"
            if "messages" in o:
                msgs = conversation(o["messages"], "", where)
                out.append(prompt_text(msgs) if len(msgs) == 1 else msgs)
            else:
                out.append(_str(o, "prompt", where))
        return out
    if not path.exists():
        raise FormatError(f"{path}: file not found")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            raise ValueError("non-finite number in JSONL row")
        return o

    text = "".join(json.dumps(r, ensure_ascii=False, default=clean) + "\n" for r in rows)
    atomic_write_text(Path(path), text)
