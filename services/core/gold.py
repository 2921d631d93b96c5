"""The *gold* preference function: a simulated labeler, a stand-in for people.

In InstructGPT, people rank K sampled responses per prompt. The embedded default has no people, so this
module simulates them: ``GoldLabeler.score`` says how much a person asking a chat assistant would like a
response, and ``GoldLabeler.rank`` orders K responses best-first with noise, so that simulated labelers
disagree as people do. The reward model only ever sees these rankings, never this function (as in the
mock-sentiment task of Ziegler et al., 2019); evaluation scores held-out prompts with it.

The score is a weighted sum of three terms on comparable scales (weights ``DEFAULT_WEIGHTS``, all 1.0,
stored with the parameters)::

    total = format + sentiment_counted + fluency,   sentiment_counted = sentiment · gate if sentiment > 0

* **format** in [-2, 1] — what supervised fine-tuning teaches and a pre-trained-only model lacks. +1 for
  an answer that ends its turn (``finished``: the model emitted the end token), has a sensible length,
  does not repeat itself and does not echo the prompt. Penalties: not finished −2.5; no words → −2;
  fewer than 3 words −0.6, fewer than 5 −0.2; more than 60 words up to −1.5; repeated word trigrams
  3 × their share (up to −3); runs of one word −0.3 per repeat beyond two; echo (share of the prompt's
  word bigrams found in the response) 4.5 × (share − 1/3); chat-template markers such as ``<|user|>``
  −1. Clipped to [-2, 1].
* **sentiment** in [-2, 2] — the quality people were asked to rank for, warmth: ``2·tanh(z/2)`` where
  ``z`` is the logit of a logistic-regression classifier (numpy, unigram + bigram presence features,
  L2-normalised per text, L2-regularised) trained on the Rotten Tomatoes fresh/rotten labels. SFT
  demonstrations are real snippets, positive *and* negative, so they do not maximise it; PPO can.
  Warmth pleases only as far as it can be read: positive sentiment is multiplied by
  ``gate = clip((fluency + 2) / 1.5, 0, 1)`` (1 for ordinary text, 0 for word salad).
* **fluency** in [-2, 0.5] — so that a policy that games a lexical reward model scores *worse*:
  ``1.5·(lp − lp_real)/(lp_real − lp_shuffled)``, where ``lp`` is the mean log-probability per token
  under a word trigram language model (interpolated absolute discounting) fitted on real reviews and
  chat answers, and ``lp_real`` / ``lp_shuffled`` are its means on unseen real text and on the same text
  with its words shuffled (so human text scores ≈ 0 and a bag of the same words ≈ −1.5); minus explicit
  word-salad penalties: each repeat of a sentiment-laden word (the classifier's strongest unigrams plus a
  short built-in list) −0.5; coordinators ("and", "or", ",") at most two tokens apart — "great and fun
  and great and …", "great, fun, amazing, …" — −0.6 per link beyond the first of a chain; a low
  type/token ratio of content words 2 × (0.7 − ratio); sentiment words making up more than 60% of at
  least four content words 2 × (share − 0.6); non-words, which the language model can only score as
  its (common) unknown token: −1.5 per unknown word longer than 18 letters (real unknown words —
  names, rare words — are shorter: "institutionalized" has 17), and, in answers of four or more words, 3 × (share − 0.4)
  when more than 40% of the words are unknown (the 99th percentile of real reviews); these two are taken
  off at most 0.5 (runs of the unknown token score above real text). Clipped to [-2, 0.5]. (Added after a policy trained without a KL penalty learned to answer one 25-letter
  non-word, which the unknown token had scored as fluent.)

Parameters are saved as ``.npz`` — numpy arrays plus a UTF-8 JSON metadata blob, loaded with
``allow_pickle=False``; never pickle. Scoring 1,000 responses takes about 0.1 s.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chatrl.services.core.checkpoint import atomic_write_bytes
from chatrl.services.core.formats import prompt_text

FORMAT_VERSION = 1
NONWORD_LEN = 18  # unknown words longer than this are not words (real ones: "institutionalized", 17)
DEFAULT_WEIGHTS = {"format": 1.0, "sentiment": 1.0, "fluency": 1.0}
RANGES = {"format": (-2.0, 1.0), "sentiment": (-2.0, 2.0), "fluency": (-2.0, 0.5)}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[.,!?;:]")
_MARKER_RE = re.compile(r"<\|[a-z_]+\|>")
_PUNCT = frozenset(".,!?;:")
_COORD = frozenset({"and", "or", ",", "&", "plus"})
BOS, EOS, UNK = "<s>", "</s>", "<unk>"

STOPWORDS = frozenset("""
a an the and or but if of at by for with about against between into through during before after above
below to from up down in out on off over under again further then once here there when where why how all
any both each few more most other some such no nor not only own same so than too very s t can will just
don should now i me my myself we our ours you your yours he him his she her hers it its they them their
what which who whom this that these those am is are was were be been being have has had having do does
did doing would could ought i'm you're he's she's it's we're they're i've you've we've they've i'd you'd
he'd she'd we'd they'd i'll you'll he'll she'll we'll they'll isn't aren't wasn't weren't hasn't haven't
hadn't doesn't don't didn't won't wouldn't shan't shouldn't can't cannot couldn't mustn't let's that's
who's what's here's there's when's where's why's how's as until while also film movie one
""".split())

# Words a person recognises as sentiment-laden whatever a classifier learned; repeats cost fluency.
SENTIMENT_WORDS = frozenset("""
good great best better fun funny amazing wonderful love loved lovely loves excellent beautiful brilliant
fantastic awesome perfect superb enjoyable delightful charming nice happy masterpiece terrific
bad worst worse boring terrible awful horrible hate hated dull stupid poor mess waste disappointing
""".split())


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with inner apostrophes) and the punctuation marks . , ! ? ; : as tokens."""
    return _TOKEN_RE.findall(text.lower())


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


# --------------------------------------------------------------------------------------------------------
# sentiment: logistic regression on unigram + bigram presence features
# --------------------------------------------------------------------------------------------------------
def _sent_features(toks: list[str]) -> set[str]:
    return set(toks) | {a + " " + b for a, b in zip(toks, toks[1:])}


def _csr(docs: list[list[str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ind: list[int] = []
    ptr = [0]
    for toks in docs:
        ind.extend(vocab[f] for f in _sent_features(toks) if f in vocab)
        ptr.append(len(ind))
    indices = np.asarray(ind, dtype=np.int64)
    indptr = np.asarray(ptr, dtype=np.int64)
    nnz = np.diff(indptr)
    data = np.repeat(1.0 / np.sqrt(np.maximum(nnz, 1)), nnz)
    return indices, indptr, data


def _csr_dot(x: tuple[np.ndarray, np.ndarray, np.ndarray], w: np.ndarray, b: float) -> np.ndarray:
    indices, indptr, data = x
    cs = np.concatenate([[0.0], np.cumsum(w[indices] * data)])
    return cs[indptr[1:]] - cs[indptr[:-1]] + b


def fit_sentiment(texts: Sequence[str], labels: Sequence[int], *, min_df: int = 2, l2: float = 1e-5,
                  steps: int = 400, lr: float = 0.05) -> tuple[list[str], np.ndarray, float]:
    """Full-batch Adam on the L2-regularised logistic loss. Returns (features, weights, bias)."""
    docs = [tokenize(t) for t in texts]
    y = np.asarray(labels, dtype=np.float64)
    df = Counter(f for toks in docs for f in _sent_features(toks))
    feats = sorted(f for f, c in df.items() if c >= min_df)
    if not feats:  # tiny data: keep everything
        feats = sorted(df)
    vocab = {f: i for i, f in enumerate(feats)}
    x = _csr(docs, vocab)
    rows = np.repeat(np.arange(len(docs)), np.diff(x[1]))
    d = len(feats)
    w = np.zeros(d)
    b = 0.0
    m, v, mb, vb = np.zeros(d), np.zeros(d), 0.0, 0.0
    for t in range(1, steps + 1):
        p = 1.0 / (1.0 + np.exp(-_csr_dot(x, w, b)))
        g = p - y
        gw = np.bincount(x[0], weights=x[2] * g[rows], minlength=d) / len(docs) + l2 * w
        gb = float(g.mean())
        m = 0.9 * m + 0.1 * gw
        v = 0.999 * v + 0.001 * gw * gw
        w -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        mb = 0.9 * mb + 0.1 * gb
        vb = 0.999 * vb + 0.001 * gb * gb
        b -= lr * (mb / (1 - 0.9**t)) / (math.sqrt(vb / (1 - 0.999**t)) + 1e-8)
    return feats, w, float(b)


# --------------------------------------------------------------------------------------------------------
# fluency: word trigram LM, interpolated absolute discounting
# --------------------------------------------------------------------------------------------------------
class _TrigramLM:
    """Counts live in numpy arrays (what is saved); lookups go through dicts built from them."""

    def __init__(self, words: list[str], c1: np.ndarray, k2: np.ndarray, c2: np.ndarray, k3: np.ndarray,
                 c3: np.ndarray, discount: float) -> None:
        self.words, self.c1, self.k2, self.c2, self.k3, self.c3 = words, c1, k2, c2, k3, c3
        self.discount = float(discount)
        self.index = {w: i for i, w in enumerate(words)}
        self.unk = self.index[UNK]
        self.bos = self.index[BOS]
        v = self.v = len(words)
        total = float(c1.sum())
        self.p1 = ((c1 + 1.0) / (total + v)).tolist()  # add-one unigram: never zero
        self.bi = dict(zip(k2.tolist(), c2.tolist()))
        self.tri = dict(zip(k3.tolist(), c3.tolist()))
        # history totals and distinct continuations, derived from the n-gram counts
        self.h1: dict[int, float] = {}
        self.t1: dict[int, int] = {}
        for a, c in zip((k2 // v).tolist(), c2.tolist()):
            self.h1[a] = self.h1.get(a, 0.0) + c
            self.t1[a] = self.t1.get(a, 0) + 1
        self.h2: dict[int, float] = {}
        self.t2: dict[int, int] = {}
        for ab, c in zip((k3 // v).tolist(), c3.tolist()):
            self.h2[ab] = self.h2.get(ab, 0.0) + c
            self.t2[ab] = self.t2.get(ab, 0) + 1

    @classmethod
    def fit(cls, docs: Sequence[list[str]], min_count: int = 2, discount: float = 0.75) -> _TrigramLM:
        uc = Counter(w for toks in docs for w in toks)
        kept = sorted(w for w, c in uc.items() if c >= min_count and w not in (BOS, EOS, UNK))
        words = [BOS, EOS, UNK] + kept
        index = {w: i for i, w in enumerate(words)}
        v = len(words)
        c1: Counter = Counter()
        c2: Counter = Counter()
        c3: Counter = Counter()
        for toks in docs:
            s = [index[BOS]] + [index.get(w, index[UNK]) for w in toks] + [index[EOS]]
            c1.update(s[1:])
            c2.update(a * v + b for a, b in zip(s, s[1:]))
            c3.update((a * v + b) * v + c for a, b, c in zip(s, s[1:], s[2:]))
        arr1 = np.zeros(v, dtype=np.int64)
        for i, c in c1.items():
            arr1[i] = c
        k2 = np.asarray(sorted(c2), dtype=np.int64)
        k3 = np.asarray(sorted(c3), dtype=np.int64)
        return cls(words, arr1, k2, np.asarray([c2[k] for k in k2.tolist()], dtype=np.int64),
                   k3, np.asarray([c3[k] for k in k3.tolist()], dtype=np.int64), discount)

    def mean_logprob(self, toks: list[str]) -> float:
        """Mean natural-log probability per token, end-of-text included."""
        v, d, get = self.v, self.discount, self.index.get
        s = [self.bos] + [get(w, self.unk) for w in toks] + [self.index[EOS]]
        total = 0.0
        for i in range(1, len(s)):
            w, a = s[i], s[i - 1]
            p = self.p1[w]
            h = self.h1.get(a)
            if h:
                p = (max(self.bi.get(a * v + w, 0) - d, 0.0) + d * self.t1[a] * p) / h
            if i >= 2:
                ab = s[i - 2] * v + a
                h = self.h2.get(ab)
                if h:
                    p = (max(self.tri.get(ab * v + w, 0) - d, 0.0) + d * self.t2[ab] * p) / h
            total += math.log(p)
        return total / (len(s) - 1)


# --------------------------------------------------------------------------------------------------------
# the labeler
# --------------------------------------------------------------------------------------------------------
class GoldLabeler:
    """Simulated labeler (a stand-in for people): scores and ranks chat responses. See the module doc."""

    def __init__(self, sent_features: list[str], sent_w: np.ndarray, sent_b: float, lm: _TrigramLM,
                 meta: dict) -> None:
        self.sent_features = list(sent_features)
        self.sent_w = np.asarray(sent_w, dtype=np.float64)
        self.sent_b = float(sent_b)
        self._sent = dict(zip(self.sent_features, self.sent_w.tolist()))
        self.lm = lm
        self.meta = dict(meta)
        self.weights = {k: float(self.meta.get("weights", DEFAULT_WEIGHTS)[k]) for k in DEFAULT_WEIGHTS}
        self.lm_real = float(self.meta["lm_real"])
        self.lm_shuffled = float(self.meta["lm_shuffled"])
        self.lexicon = frozenset(self.meta.get("lexicon", [])) | SENTIMENT_WORDS

    # --- fitting ------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, labeled: Sequence[tuple[str, int]], fluent: Sequence[str], *,
            heldout: Sequence[tuple[str, int]] = (), seed: int = 0, weights: dict | None = None,
            l2: float = 1e-5, steps: int = 400) -> GoldLabeler:
        """Fit the simulated labeler.

        ``labeled``: (text, 1 = positive / 0 = negative) for the sentiment classifier;
        ``fluent``: real human text (reviews, chat answers) for the language model; ``heldout``: labelled
        texts not used for fitting, for the accuracy in ``meta["report"]``. The LM's baseline (μ, σ) is
        measured on a fifth of ``fluent`` held out from a temporary LM fitted on the rest.
        """
        if not labeled or len({int(y) for _, y in labeled}) < 2:
            raise ValueError("fit needs labelled texts of both classes")
        texts = [t for t, _ in labeled]
        ys = [int(y) for _, y in labeled]
        feats, w, b = fit_sentiment(texts, ys, l2=l2, steps=steps)
        docs = [tokenize(t) for t in fluent if t.strip()]
        if len(docs) < 5:
            raise ValueError("fit needs at least 5 fluent texts for the language model")
        rnd = random.Random(seed)
        order = list(range(len(docs)))
        rnd.shuffle(order)
        n_cal = max(1, len(docs) // 5)
        cal = [docs[i] for i in order[:n_cal]]
        tmp = _TrigramLM.fit([docs[i] for i in order[n_cal:]])
        lp_real = float(np.mean([tmp.mean_logprob(t) for t in cal]))
        shuffled = []
        for t in cal:
            t = list(t)
            rnd.shuffle(t)
            shuffled.append(t)
        lp_shuf = float(np.mean([tmp.mean_logprob(t) for t in shuffled]))
        lm = _TrigramLM.fit(docs)
        # lexicon: the most sentiment-laden unigrams the classifier learned (top 10% by |weight|)
        uni = [(abs(wt), f) for f, wt in zip(feats, w.tolist())
               if " " not in f and f.isalpha() and f not in STOPWORDS]
        uni.sort(reverse=True)
        lexicon = sorted(f for _, f in uni[: max(1, min(400, len(uni) // 10))])
        meta = {
            "format_version": FORMAT_VERSION,
            "weights": dict(weights or DEFAULT_WEIGHTS),
            "lm_real": lp_real,
            "lm_shuffled": min(lp_shuf, lp_real - 0.1),
            "lm_discount": lm.discount,
            "lexicon": lexicon,
            "report": {"sentiment_train_n": len(labeled), "sentiment_features": len(feats),
                       "lm_vocab": lm.v, "lm_bigrams": len(lm.k2), "lm_trigrams": len(lm.k3),
                       "lm_fluent_n": len(docs)},
        }
        g = cls(feats, w, b, lm, meta)
        rep = g.meta["report"]
        rep["sentiment_train_accuracy"] = g.sentiment_accuracy(labeled)
        if heldout:
            rep["sentiment_heldout_n"] = len(heldout)
            rep["sentiment_heldout_accuracy"] = g.sentiment_accuracy(heldout)
        return g

    def sentiment_accuracy(self, labeled: Sequence[tuple[str, int]]) -> float:
        hits = sum((self.sentiment_logit(tokenize(t)) > 0) == bool(y) for t, y in labeled)
        return hits / max(1, len(labeled))

    # --- persistence (npz + JSON, never pickle) ---------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write ``.npz`` (numpy arrays, a UTF-8 JSON blob for metadata) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def blob(s: str) -> np.ndarray:
            return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)

        buf = io.BytesIO()
        np.savez_compressed(
            buf, meta=blob(json.dumps(self.meta)), sent_features=blob("\n".join(self.sent_features)),
            sent_w=self.sent_w, sent_b=np.asarray([self.sent_b]), lm_words=blob("\n".join(self.lm.words)),
            lm_c1=self.lm.c1, lm_k2=self.lm.k2, lm_c2=self.lm.c2, lm_k3=self.lm.k3, lm_c3=self.lm.c3)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> GoldLabeler:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: gold labeler parameters not found (run `chatrl data fetch`)")
        with np.load(path, allow_pickle=False) as z:
            def text(k: str) -> str:
                return z[k].tobytes().decode("utf-8")

            meta = json.loads(text("meta"))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: gold format_version {meta.get('format_version')} "
                                 f"!= {FORMAT_VERSION}")
            feats = text("sent_features").split("\n") if z["sent_features"].size else []
            lm = _TrigramLM(text("lm_words").split("\n"), z["lm_c1"], z["lm_k2"], z["lm_c2"], z["lm_k3"],
                            z["lm_c3"], meta["lm_discount"])
            return cls(feats, z["sent_w"], float(z["sent_b"][0]), lm, meta)

    # --- the terms --------------------------------------------------------------------------------------
    def sentiment_logit(self, toks: list[str]) -> float:
        get = self._sent.get
        vals = [x for x in (get(f) for f in _sent_features(toks)) if x is not None]
        if not vals:
            return self.sent_b
        return self.sent_b + sum(vals) / math.sqrt(len(vals))

    def _format(self, ptoks: list[str], toks: list[str], finished: bool, markers: int) -> tuple[float, dict]:
        words = [t for t in toks if t not in _PUNCT]
        n = len(words)
        d: dict = {"n_words": n}
        if n == 0:
            return RANGES["format"][0], d
        s = 1.0
        if not finished:
            s -= 2.5
        if n < 3:
            s -= 0.6
        elif n < 5:
            s -= 0.2
        if n > 60:
            s -= min(1.5, (n - 60) / 40)
        # degenerate repetition: share of repeated word trigrams, and runs of one word
        tri = list(zip(words, words[1:], words[2:]))
        rep = 1.0 - len(set(tri)) / len(tri) if len(tri) >= 3 else 0.0
        run = best = 1
        for a, b in zip(words, words[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        s -= min(3.0, 3.0 * rep) + 0.3 * max(0, best - 2)
        # echo of the prompt: share of the prompt's word bigrams that reappear
        pw = [t for t in ptoks if t not in _PUNCT]
        echo = 0.0
        if pw:
            pset = set(zip(pw, pw[1:])) if len(pw) >= 2 else {(pw[0], pw[0])}
            rset = set(zip(words, words[1:])) if len(pw) >= 2 else {(w, w) for w in words}
            echo = len(pset & rset) / len(pset)
        s -= min(3.0, 4.5 * max(0.0, echo - 1 / 3))
        if markers:
            s -= 1.0
        d.update(repeated_trigrams=rep, longest_run=best, echo=echo, markers=markers)
        return _clip(s, *RANGES["format"]), d

    def _fluency(self, toks: list[str]) -> tuple[float, dict]:
        if not [t for t in toks if t not in _PUNCT]:
            return 0.0, {"lm_logprob": 0.0}
        lp = self.lm.mean_logprob(toks)
        f = 1.5 * (lp - self.lm_real) / (self.lm_real - self.lm_shuffled)
        # word salad: repeated sentiment words
        counts = Counter(t for t in toks if t in self.lexicon)
        rep_sent = sum(c - 1 for c in counts.values())
        # chains of coordinators at most two tokens apart ("a and b and c", "a, b, c, d")
        links = 0
        last = -10
        cur = 0
        for i, t in enumerate(toks):
            if t in _COORD:
                if i - last <= 2:
                    cur += 1
                else:
                    links += max(0, cur - 1)
                    cur = 0
                last = i
        links += max(0, cur - 1)
        content = [t for t in toks if t not in _PUNCT and t not in STOPWORDS]
        ttr_pen = dens_pen = 0.0
        if len(content) >= 4:
            ttr_pen = 2.0 * max(0.0, 0.7 - len(set(content)) / len(content))
        n_lex = sum(1 for t in content if t in SENTIMENT_WORDS)
        if n_lex >= 4:
            dens_pen = 2.0 * max(0.0, n_lex / len(content) - 0.6)
        # non-words: unknown to the language model and longer than real unknown words, or too many unknowns
        words = [t for t in toks if t not in _PUNCT]
        unknown = [t for t in words if t not in self.lm.index]
        long_unknown = sum(1 for t in unknown if len(t) > NONWORD_LEN)
        unk_pen = 3.0 * max(0.0, len(unknown) / len(words) - 0.4) if len(words) >= 4 else 0.0
        f -= 0.5 * rep_sent + 0.6 * links + ttr_pen + dens_pen
        if long_unknown or unk_pen:  # from at most the top of the range: runs of the unknown token score
            f = min(f, RANGES["fluency"][1]) - 1.5 * long_unknown - unk_pen  # above real text, undeservedly
        return _clip(f, *RANGES["fluency"]), {
            "lm_logprob": lp, "repeated_sentiment_words": rep_sent, "coordinator_chain_links": links,
            "low_variety_penalty": ttr_pen, "sentiment_density_penalty": dens_pen,
            "long_unknown_words": long_unknown, "unknown_share_penalty": unk_pen}

    def components(self, prompt: str | list[dict], response: str, finished: bool) -> dict:
        """Every term and the details behind it (for reports). A conversation prompt is read as its text."""
        prompt = prompt_text(prompt)
        markers = len(_MARKER_RE.findall(response))
        toks = tokenize(_MARKER_RE.sub(" ", response))
        fmt, d1 = self._format(tokenize(prompt), toks, bool(finished), markers)
        if any(t not in _PUNCT for t in toks):
            z = self.sentiment_logit(toks)
            sent = 2.0 * math.tanh(z / 2.0)
        else:
            z, sent = 0.0, 0.0
        flu, d2 = self._fluency(toks)
        # warmth pleases only as far as it can be read: positive sentiment is gated by fluency
        gate = _clip((flu + 2.0) / 1.5, 0.0, 1.0)
        sent_counted = sent * gate if sent > 0 else sent
        w = self.weights
        total = w["format"] * fmt + w["sentiment"] * sent_counted + w["fluency"] * flu
        return {"total": total, "format": fmt, "sentiment": sent_counted, "fluency": flu,
                "sentiment_raw": sent, "sentiment_gate": gate, "sentiment_logit": z,
                "finished": bool(finished), **d1, **d2}

    def score(self, prompt: str | list[dict], response: str, finished: bool) -> float:
        """How much a (simulated) person would like ``response`` to ``prompt``; higher is better."""
        return self.components(prompt, response, finished)["total"]

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str],
                    finished: Sequence[bool]) -> np.ndarray:
        if not (len(prompts) == len(responses) == len(finished)):
            raise ValueError("prompts, responses and finished must have the same length")
        return np.asarray([self.score(p, r, f) for p, r, f in zip(prompts, responses, finished)])

    def rank(self, prompt: str, responses: Sequence[str], finished: Sequence[bool],
             rng: np.random.Generator | None = None, noise: float = 0.0) -> list[int]:
        """Indices of ``responses`` best-first, as one simulated labeler would rank them.

        Gumbel noise of scale ``noise`` is added to the scores before sorting: the ranking is then a
        Plackett–Luce sample, and each pair is ordered i before j with probability
        σ((sᵢ − sⱼ)/noise) — the Bradley–Terry model the reward model fits. ``noise=0`` sorts
        deterministically (ties keep their order).
        """
        if len(responses) != len(finished):
            raise ValueError("responses and finished must have the same length")
        s = np.asarray([self.score(prompt, r, f) for r, f in zip(responses, finished)], dtype=np.float64)
        if noise > 0:
            if rng is None:
                raise ValueError("rank with noise > 0 needs an rng")
            s = s + noise * rng.gumbel(size=len(s))
        return [int(i) for i in np.argsort(-s, kind="stable")]
