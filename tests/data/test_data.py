"""Data layer: sources, cleaning, tokenizer, prepare (small generated fixtures, offline, seconds)."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worldlm.data import clean
from worldlm.data.prepare import prepare_recipe, prepare_sources, split_documents
from worldlm.data.prepared import SPLITS, load_prepared
from worldlm.data.recipes import Fetcher, deb_files, email_text, foldoc_entry, hpo_term, man_page_text
from worldlm.data.sources import SourceSpec, read_documents
from worldlm.data.tokenizer import EOT, decode, encode, encode_documents, load_tokenizer, train_tokenizer
from worldlm.errors import DataError

FR = (
    "La commande affiche le contenu des fichiers et les options sont décrites dans cette page "
    "pour que vous puissiez les utiliser."
)
IT = (
    "Il comando mostra il contenuto dei file e le opzioni sono descritte in questa pagina "
    "per essere usate anche dagli utenti."
)
EN = "The command prints the contents of the files, and the options are described in this page."
UK = "Ця команда показує вміст файлів, які можна змінити, а також їхні параметри для користувача."
RU = "Эта команда показывает содержимое файлов, которые можно изменить, а также их параметры."


# --- sources ---------------------------------------------------------------------------------


def test_text_file_documents_are_blank_line_separated(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    assert list(read_documents(SourceSpec(str(path)))) == ["first doc\nline two", "second doc", "third"]


def test_folder_is_one_document_per_file_sorted_skipping_links_and_hidden(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n\nstill zed", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    assert list(read_documents(SourceSpec(str(tmp_path)))) == ["alpha", "zed\n\nstill zed"]


def test_jsonl_field_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one"}\n\n{"body": "two", "id": 2}\n', encoding="utf-8")
    assert list(read_documents(SourceSpec(str(path), "jsonl", "body"))) == ["one", "two"]
    with pytest.raises(DataError, match=r"docs.jsonl:1: no field 'text' \(found: body\)"):
        list(read_documents(SourceSpec(str(path), "jsonl")))
    path.write_text('{"body": "one"}\n{"body": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs.jsonl:2: invalid JSON"):
        list(read_documents(SourceSpec(str(path), "jsonl", "body")))


def test_parquet_column_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), path)
    assert list(read_documents(SourceSpec(str(path), "parquet", "content"))) == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"no column 'text' \(found: content, n\)"):
        list(read_documents(SourceSpec(str(path), "parquet")))
    with pytest.raises(DataError, match="expected strings"):
        list(read_documents(SourceSpec(str(path), "parquet", "n")))


def test_source_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(SourceSpec(str(tmp_path / "missing.txt"))))
    with pytest.raises(DataError, match="unknown format 'csv'"):
        SourceSpec("x", "csv")  # type: ignore[arg-type]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_documents(SourceSpec(str(tmp_path / "bin.txt"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \*.jsonl files"):
        list(read_documents(SourceSpec(str(tmp_path / "empty"), "jsonl")))


# --- cleaning --------------------------------------------------------------------------------


def test_whitespace_paragraphs_and_duplicates() -> None:
    text = "  Hello \t world \n\n\n\n e\u0301t\u00e9 \r\n next line \n\n  Hello world  "
    paragraphs = clean.split_paragraphs(text)
    assert paragraphs == ["Hello world", "été\nnext line", "Hello world"]
    seen: set[str] = set()
    assert clean.drop_duplicates(paragraphs, seen) == ["Hello world", "été\nnext line"]
    assert clean.drop_duplicates(["Hello world", "new"], seen) == ["new"]  # memory spans documents


@pytest.mark.parametrize(("text", "language"), [(FR, "fr"), (IT, "it"), (EN, "en"), (UK, "uk"), (RU, "ru")])
def test_language_identification(text: str, language: str) -> None:
    assert clean.detect_language(text) == language


def test_language_filter_drops_untranslated_english_and_code() -> None:
    assert clean.keep_language([UK, EN, "ls -la /dev/null", RU], "uk") == [UK]
    assert clean.detect_language("ls -la /dev/null") is None
    assert clean.detect_language("12345 ...") is None


def test_uk_and_ru_are_told_apart_by_letters_alone() -> None:
    assert clean.detect_language("Параметри: їжак, ґанок, єнот") == "uk"
    assert clean.detect_language("Параметры: съезд, эхо, ёжик") == "ru"


def test_script_fractions() -> None:
    assert clean.script_fractions("abc где") == (0.5, 0.5)
    assert clean.script_fractions("123") == (0.0, 0.0)


def test_strip_markup_html_xhp_and_mallard() -> None:
    page = (
        "<html><head><title>T</title><script>var x = 1;</script></head><body><header>Menu</header>"
        "<h1>Titre</h1><p class='x'>Un <b>texte</b> &amp; du <a href='#'>lien</a>.</p>"
        "<!-- comment --><footer>debug</footer></body></html>"
    )
    assert clean.strip_markup(page) == "Titre\n\nUn texte & du lien."
    mallard = (
        '<page xmlns="http://projectmallard.org/1.0/"><info><credit><name>Shaun</name></credit></info>'
        "<title>Клавіатура</title><p>Натисніть <gui>Масштаб</gui>.</p></page>"
    )
    assert clean.strip_markup(mallard) == "Клавіатура\n\nНатисніть Масштаб."


def test_strip_terminal_formatting() -> None:
    assert clean.strip_terminal_formatting("N\bNA\bAM\bME\bE _\bf_\bi\x1b[1mx\x1b[0m") == "NAME fix"


def test_strip_roff() -> None:
    roff = (
        '.\\" comment\n.TH LS 1\n.SH "NOM"\nls \\- lister\n.PP\n.B ls\naffiche le \\fIcontenu\\fR '
        "des r\\('epertoires \\(em vite.\n.SH VOIR AUSSI\n"
    )
    expected = "NOM\nls - lister\n\nls\naffiche le contenu des répertoires — vite.\n\nVOIR AUSSI"
    assert clean.strip_roff(roff) == expected


def test_man_page_builtin_renderer_drops_translator_credits() -> None:
    roff = b".TH LS 1\n.SH NOM\nls - lister\n.SH TRADUCTION\nLa traduction est de Marie.\n"
    assert man_page_text(roff, "fr", renderer="builtin") == "NOM\nls - lister\n\n"
    assert man_page_text(b".so man1/ls.1\n", "fr", renderer="builtin") == ""


def test_email_text_keeps_subject_and_body_without_headers_or_quotes() -> None:
    raw = (
        "From: a@example.org\nSubject: Hello there\nContent-Type: text/plain; charset=utf-8\n\n"
        "> quoted reply\nThe body of the message.\n"
    )
    assert email_text(raw) == "Hello there\n\nThe body of the message.\n"


def test_foldoc_and_hpo_entries() -> None:
    entry = "actor\n\n   <programming> In {object-oriented} programming, an\n   {object}.\n\n   (1994-11-08)"
    assert foldoc_entry(entry) == "actor\n\n<programming> In object-oriented programming, an object."
    stanza = '[Term]\nid: HP:1\nname: Short stature\ndef: "A \\"small\\" height." [ref]\ncomment: Common.'
    assert hpo_term(stanza) == 'Short stature\nA "small" height.\nCommon.'
    assert hpo_term("[Term]\nid: HP:2\nname: Bare") == ""
    assert hpo_term("[Typedef]\nid: x") == ""


# --- tokenizer -------------------------------------------------------------------------------


def _corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = (FR + " " + IT + " " + UK).split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]


def test_tokenizer_round_trip_and_eot(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(_corpus(), vocab_size=400)
    assert tokenizer.token_to_id(EOT) == 0
    for text in [FR, UK, "emoji 🚀 and tabs\tand\nnewlines", "   leading spaces"]:
        assert decode(tokenizer, encode(tokenizer, text)) == text
    assert 0 not in encode(tokenizer, FR)
    stream = encode_documents(tokenizer, ["ab", "cd"], np.dtype(np.uint16))
    assert stream.dtype == np.uint16 and list(stream).count(0) == 2 and stream[-1] == 0
    path = tmp_path / "tok.json"
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    assert encode(load_tokenizer(path), FR) == encode(tokenizer, FR)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(DataError, match="missing"):
        load_tokenizer(tmp_path / "nope.json")


# --- prepare ---------------------------------------------------------------------------------


def _write_sources(root: Path) -> dict[str, SourceSpec]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("\n\n".join(_corpus(40, seed=1)), encoding="utf-8")
    with (root / "b.jsonl").open("w", encoding="utf-8") as fh:
        for doc in _corpus(30, seed=2):
            fh.write(json.dumps({"text": doc}) + "\n")
    return {"a": SourceSpec(str(root / "a.txt")), "b": SourceSpec(str(root / "b.jsonl"), "jsonl")}


def test_prepare_sources_end_to_end(tmp_path: Path) -> None:
    specs = _write_sources(tmp_path / "src")
    messages: list[str] = []
    prepared = prepare_sources(specs, tmp_path / "out", vocab_size=512, progress=messages.append)
    assert prepared.sources == ["a", "b"] and prepared.dtype == "uint16" and prepared.eot_id == 0
    assert messages, "progress was reported"
    tokenizer = load_tokenizer(prepared.tokenizer_file)
    for source, docs in (("a", list(read_documents(specs["a"]))), ("b", list(read_documents(specs["b"])))):
        total_chars = 0
        n_docs = 0
        for split in SPLITS:
            info = prepared.splits[source][split]
            tokens = prepared.tokens(source, split)
            assert info.tokens == tokens.size > 0
            total_chars += info.chars
            n_docs += int((tokens == prepared.eot_id).sum())
            assert tokens[-1] == prepared.eot_id  # every document is terminated
            texts = decode(tokenizer, tokens).split(EOT)[:-1]
            assert sum(map(len, texts)) == info.chars and set(texts) <= set(docs)
        assert total_chars == sum(map(len, docs)) and n_docs == len(docs)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["recipe"] == "custom" and manifest["sources"]["b"]["origin"][0]["format"] == "jsonl"


def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path: Path) -> None:
    specs = _write_sources(tmp_path / "src")
    out = tmp_path / "out"
    prepare_sources(specs, out, vocab_size=512)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    messages: list[str] = []
    again = prepare_sources(specs, out, vocab_size=512, progress=messages.append)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and messages == []  # nothing redone
    assert again.splits == load_prepared(out).splits
    rebuilt = prepare_sources(specs, out, vocab_size=600)  # other inputs: rebuild
    assert rebuilt.manifest["inputs"]["vocab_size"] == 600  # type: ignore[index]
    (out / "tokens" / "a" / "val.bin").write_bytes(b"\0\0")  # corrupted file: rebuild
    repaired = prepare_sources(specs, out, vocab_size=600)
    assert repaired.tokens("a", "val").size == repaired.splits["a"]["val"].tokens


def test_splits_are_deterministic_per_seed(tmp_path: Path) -> None:
    specs = _write_sources(tmp_path / "src")
    first = prepare_sources(specs, tmp_path / "one", vocab_size=512, seed=3)
    second = prepare_sources(specs, tmp_path / "two", vocab_size=512, seed=3)
    other = prepare_sources(specs, tmp_path / "three", vocab_size=512, seed=4)
    digests = [[i.sha256 for v in p.splits.values() for i in v.values()] for p in (first, second, other)]
    assert digests[0] == digests[1] and digests[0] != digests[2]
    assert first.tokenizer_sha256 == second.tokenizer_sha256


def test_split_documents_sizes_and_errors() -> None:
    docs = [f"document number {i} " * (1 + i % 7) for i in range(200)]
    parts = split_documents("s", docs, seed=0, val_fraction=0.1, test_fraction=0.05)
    assert sorted(doc for part in parts.values() for doc in part) == sorted(docs)
    total = sum(map(len, docs))
    assert 0 < sum(map(len, parts["val"])) <= 0.1 * total and 0 < sum(map(len, parts["test"])) <= 0.05 * total
    tiny = split_documents("s", ["a", "b", "c"], seed=0, val_fraction=0.05, test_fraction=0.05)
    assert all(len(tiny[s]) == 1 for s in SPLITS)
    with pytest.raises(DataError, match="source 's' has 2 non-empty document"):
        split_documents("s", ["a", "b", " "], seed=0, val_fraction=0.05, test_fraction=0.05)
    assert EOT not in "".join(split_documents("s", [f"x{EOT}y", "b", "c"], 0, 0.05, 0.05)["train"])


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_sources({"a": SourceSpec(str(tmp_path / "missing.txt"))}, tmp_path / "out")
    (tmp_path / "small.txt").write_text("only one document", encoding="utf-8")
    with pytest.raises(DataError, match="train, val and test each need one"):
        prepare_sources({"a": SourceSpec(str(tmp_path / "small.txt"))}, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match=r"source name '\.\./x' is not usable"):
        prepare_sources({"../x": SourceSpec(str(tmp_path / "small.txt"))}, tmp_path / "out")
    with pytest.raises(DataError, match="must be in"):
        prepare_sources({"a": SourceSpec(str(tmp_path / "small.txt"))}, tmp_path / "out", val_fraction=0.0)


def test_prepare_with_a_given_tokenizer(tmp_path: Path) -> None:
    specs = _write_sources(tmp_path / "src")
    first = prepare_sources(specs, tmp_path / "one", vocab_size=512)
    reused = prepare_sources(specs, tmp_path / "two", tokenizer_file=first.tokenizer_file)
    assert reused.tokenizer_sha256 == first.tokenizer_sha256
    assert reused.splits["a"]["train"].sha256 == first.splits["a"]["train"].sha256
    (tmp_path / "no_eot.json").write_text(train_tokenizer(_corpus(), 300).to_str().replace(EOT, "<eos>"))
    with pytest.raises(DataError, match=r"has no '<\|endoftext\|>' token"):
        prepare_sources(specs, tmp_path / "three", tokenizer_file=tmp_path / "no_eot.json")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_page_rendered_with_groff() -> None:
    roff = (
        ".TH LS 1 2023 coreutils\n.SH NOM\nls \\- lister le contenu des r\\('epertoires\n"
        ".SH DESCRIPTION\nAffiche \\fBtout\\fR.\n.SH TRADUCTION\nMarie.\n"
    )
    text = man_page_text(gzip.compress(roff.encode()), "fr")
    assert clean.split_paragraphs(text) == [
        "NOM\nls - lister le contenu des répertoires",
        "DESCRIPTION\nAffiche tout.",
    ]


# --- recipes (offline: fake package clients) -------------------------------------------------

FAKE_APT = """#!/bin/sh
echo "$@" >> "$FAKE_LOG"
case "$1 $2" in
  update*) exit 0 ;;
  "download good") touch good_1%3a2.0-1_all.deb; exit 0 ;;
  *) echo "E: Unable to locate package $2" >&2; exit 100 ;;
esac
"""


def _fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_debian_fetch_caches_and_records_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_apt(tmp_path, monkeypatch)
    fetcher = Fetcher(tmp_path / "downloads", lambda _msg: None)
    package = fetcher.debian("good")
    assert package.origin() == {"package": "good", "version": "1:2.0-1", "registry": "debian"}
    assert package.file.parent == tmp_path / "downloads" / "debian"
    fetcher.debian("good")  # cached: apt-get is not run again
    assert log.read_text().splitlines() == ["download good"]


def test_debian_fetch_failure_names_package_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_apt(tmp_path, monkeypatch)
    fetcher = Fetcher(tmp_path / "downloads", lambda _msg: None)
    with pytest.raises(DataError, match=r"package nosuch: `apt-get download nosuch` failed: E: Unable to locate"):
        fetcher.debian("nosuch")
    # The package lists are refreshed once, then the download is retried.
    assert log.read_text().splitlines() == ["download nosuch", "update", "download nosuch"]
    assert not list((tmp_path / "downloads" / "debian").iterdir())  # nothing half-downloaded is kept


def test_missing_client_and_unknown_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="`npm` is not installed"):
        Fetcher(tmp_path, lambda _msg: None).npm("@scope/pkg", "1.0.0")
    with pytest.raises(DataError, match="unknown recipe 'nope'; use one of languages, domains"):
        prepare_recipe("nope", tmp_path / "out")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_deb_files_reads_regular_files_and_skips_links(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: fake\nVersion: 1.0\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: test\n"
    )
    man = root / "usr" / "share" / "man" / "fr" / "man1"
    man.mkdir(parents=True)
    (man / "ls.1.gz").write_bytes(gzip.compress(b".TH LS 1\n"))
    (man / "dir.1.gz").symlink_to("ls.1.gz")
    (root / "usr" / "share" / "other.txt").write_text("not a man page")
    deb = tmp_path / "fake_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    files = deb_files(deb, "usr/share/man/fr/")
    assert [(name, gzip.decompress(data)) for name, data in files] == [("usr/share/man/fr/man1/ls.1.gz", b".TH LS 1\n")]
