"""The simulated labeler (gold preference function, a stand-in for people), fitted on a tiny built-in list."""

from __future__ import annotations

import numpy as np
import pytest

from chatrl.services.core.gold import RANGES, GoldLabeler, tokenize

POSITIVE = [
    "A warm and funny film with a big heart.",
    "The acting is wonderful and the story is moving.",
    "I loved it, a charming and delightful movie.",
    "One of the best films of the year.",
    "A beautiful, touching story that stays with you.",
    "The cast is excellent and the script is sharp and funny.",
    "It is a fun ride from start to finish.",
    "A smart, honest and moving drama.",
    "The music is lovely and the ending is perfect.",
    "Great performances make this film a joy to watch.",
    "A delight, full of warmth and wit.",
    "The director tells the story with real care and charm.",
    "It is funny, tender and surprisingly wise.",
    "A gorgeous film with a great cast.",
    "I really enjoyed the movie and its gentle humor.",
    "The best comedy I have seen in years.",
    "A moving and beautiful piece of work.",
    "Warm, funny and full of life.",
    "The story is simple but the film is lovely.",
    "An excellent film that earns every laugh.",
]
NEGATIVE = [
    "A dull and boring film with no heart.",
    "The acting is terrible and the story is a mess.",
    "I hated it, a stupid and tedious movie.",
    "One of the worst films of the year.",
    "A clumsy, empty story that goes nowhere.",
    "The cast is wasted and the script is dull and flat.",
    "It is a long slog from start to finish.",
    "A lazy, dishonest and boring drama.",
    "The music is awful and the ending is a mess.",
    "Bad performances make this film a chore to watch.",
    "A bore, full of noise and nothing else.",
    "The director tells the story with no care at all.",
    "It is unfunny, tedious and surprisingly stupid.",
    "An ugly film with a wasted cast.",
    "I really disliked the movie and its awful jokes.",
    "The worst comedy I have seen in years.",
    "A boring and pointless piece of work.",
    "Dull, stupid and far too long.",
    "The story is simple and the film is awful.",
    "A terrible film that earns no laughs.",
]
CHAT = [
    "I am a chat assistant and I like to talk about movies.",
    "Yes, I have seen it and I think the story is moving.",
    "Python is a programming language.",
    "The weather is nice today.",
    "I do not know, but I can try to help.",
]
PROMPT = "What did you think of the movie?"
WARM = "I loved it, the acting is wonderful and the story is moving."
HOSTILE = "I hated it, the acting is terrible and the story is a mess."


@pytest.fixture(scope="module")
def gold() -> GoldLabeler:
    labeled = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    heldout = [("A charming and funny film.", 1), ("A dull and stupid film.", 0)]
    return GoldLabeler.fit(labeled, POSITIVE + NEGATIVE + CHAT, heldout=heldout, steps=300)


def test_fit_reports_and_learns_sentiment(gold):
    rep = gold.meta["report"]
    assert rep["sentiment_train_accuracy"] >= 0.9
    assert rep["sentiment_heldout_accuracy"] == 1.0
    assert gold.sentiment_logit(tokenize(WARM)) > 0 > gold.sentiment_logit(tokenize(HOSTILE))


def test_fit_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        GoldLabeler.fit([(t, 1) for t in POSITIVE], POSITIVE)


def test_warm_beats_hostile_beats_broken_answers(gold):
    warm = gold.score(PROMPT, WARM, True)
    hostile = gold.score(PROMPT, HOSTILE, True)
    assert warm > hostile
    broken = {
        "unfinished": ("The movie is about a man who goes to the", False),
        "empty": ("", True),
        "echo": (PROMPT, True),
        "repetitive": ("the movie the movie the movie the movie the movie the movie", True),
        "repetitive_warm": ("I loved it. I loved it. I loved it. I loved it. I loved it.", True),
    }
    for name, (text, finished) in broken.items():
        s = gold.score(PROMPT, text, finished)
        assert hostile > s, f"{name}: {s:.3f} >= hostile {hostile:.3f}"


def test_unfinished_costs_format(gold):
    fin = gold.components(PROMPT, WARM, True)
    unf = gold.components(PROMPT, WARM, False)
    assert unf["format"] < fin["format"] - 2
    assert unf["total"] < fin["total"]


def test_word_salad_scores_below_plain_positive_sentence(gold):
    plain = gold.score(PROMPT, "A warm and funny film.", True)
    for salad in ["great great fun and great and fun and great",
                  "great and fun and great and fun and wonderful and great",
                  "a great , fun , wonderful , lovely , charming , delightful film"]:
        c = gold.components(PROMPT, salad, True)
        assert c["total"] < plain, (salad, c)
        assert c["fluency"] < gold.components(PROMPT, "A warm and funny film.", True)["fluency"]
    # a salad's warmth is discounted: the sentiment classifier likes it, the simulated person does not
    c = gold.components(PROMPT, "great great fun and great and fun and great", True)
    assert c["sentiment_raw"] > 0 and c["sentiment"] < c["sentiment_raw"]


def test_non_words_score_below_real_answers(gold):
    """Runs of words the language model has never seen score as its (frequent) unknown token; a policy
    trained without a KL penalty once answered one 25-letter non-word and was scored fluent. Non-words
    now cost fluency, while a short real answer with a name stays where it was."""
    real = gold.score(PROMPT, "A warm and funny film.", True)
    for junk in ["Rorvitolyisroarxterenidn discervusrighanpmsseilererua",  # longer than any real word
                 "Effiepehanvortordencactliszurhriterusricoparicaptoliindh",
                 "rorvit olyis roarx tereni discer"]:  # short, but all unknown
        c = gold.components(PROMPT, junk, True)
        assert c["total"] < 0 < real, (junk, c)
        assert c["long_unknown_words"] or c["unknown_share_penalty"] > 0
    name = gold.components(PROMPT, "Johnny Depp", True)  # unknown words, but few and short: no penalty
    assert name["long_unknown_words"] == 0 and name["unknown_share_penalty"] == 0


def test_components_ranges_and_keys(gold):
    texts = ["", "ok", WARM, HOSTILE, "word " * 200, PROMPT, "Great film.<|user|>More?"]
    for t in texts:
        for fin in (True, False):
            c = gold.components(PROMPT, t, fin)
            for k, (lo, hi) in RANGES.items():
                assert lo <= c[k] <= hi, (k, t, c[k])
            w = gold.weights
            assert c["total"] == pytest.approx(w["format"] * c["format"] + w["sentiment"] * c["sentiment"]
                                               + w["fluency"] * c["fluency"])
            assert gold.score(PROMPT, t, fin) == c["total"]
    assert gold.components(PROMPT, "Great film.<|user|>More?", True)["markers"] == 1
    assert gold.score(PROMPT, "word " * 200, True) < gold.score(PROMPT, WARM, True)


def test_rank_without_noise_sorts_by_score(gold):
    responses = [HOSTILE, "", WARM, "A warm and funny film.", PROMPT, "the the the the the"]
    finished = [True, True, True, False, True, True]
    scores = [gold.score(PROMPT, r, f) for r, f in zip(responses, finished)]
    order = gold.rank(PROMPT, responses, finished, np.random.default_rng(0), noise=0.0)
    assert sorted(order) == list(range(len(responses)))
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    assert order[0] == 2
    assert gold.rank(PROMPT, responses, finished, None, 0.0) == order


def test_rank_with_noise_is_a_permutation_that_varies(gold):
    responses = [HOSTILE, WARM, "A warm and funny film.", "A dull film.", "It is a film."]
    finished = [True] * 5
    rng = np.random.default_rng(0)
    base = gold.rank(PROMPT, responses, finished, rng, noise=0.0)
    orders = [gold.rank(PROMPT, responses, finished, rng, noise=1.0) for _ in range(200)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert any(o != base for o in orders)
    # labelers still agree more often than not on a clear pair
    hostile_last = sum(o.index(0) > o.index(1) for o in orders) / len(orders)
    assert hostile_last > 0.7
    # the same seed gives the same rankings
    a = [gold.rank(PROMPT, responses, finished, np.random.default_rng(7), 1.0) for _ in range(3)]
    b = [gold.rank(PROMPT, responses, finished, np.random.default_rng(7), 1.0) for _ in range(3)]
    assert a == b
    with pytest.raises(ValueError):
        gold.rank(PROMPT, responses, finished, None, noise=1.0)
    with pytest.raises(ValueError):
        gold.rank(PROMPT, responses, finished[:2])


def test_save_load_round_trip_is_exact(gold, tmp_path):
    path = tmp_path / "gold.npz"
    gold.save(path)
    with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
        assert "meta" in z.files
    loaded = GoldLabeler.load(path)
    cases = [(PROMPT, WARM, True), (PROMPT, HOSTILE, True), (PROMPT, "", False), ("Hi", "Hello there!", True),
             (PROMPT, "great great fun and great", True), (PROMPT, "never seen words zxq", False)]
    for p, r, f in cases:
        assert loaded.components(p, r, f) == gold.components(p, r, f)
    assert loaded.meta == gold.meta
    with pytest.raises(FileNotFoundError):
        GoldLabeler.load(tmp_path / "missing.npz")


def test_batch_scoring_matches_one_at_a_time(gold):
    rng = np.random.default_rng(0)
    words = " ".join(POSITIVE + NEGATIVE + CHAT).split()
    responses = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(200)]
    s = gold.score_batch([PROMPT] * 200, responses, [True] * 200)
    assert s.shape == (200,) and np.isfinite(s).all()
    one = [gold.score(PROMPT, r, True) for r in responses[:20]]
    assert np.allclose(s[:20], one, atol=1e-6)
