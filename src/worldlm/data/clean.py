"""Small pure text-cleaning helpers used by the offline recipes (and usable on users' text).

Everything here is a function of its arguments only (the paragraph de-duplicator keeps its memory
in a set the caller owns), so recipes stay deterministic and each helper is testable on a line.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable

# --- whitespace and paragraphs ---------------------------------------------------------------

_HSPACE = re.compile(r"[^\S\n]+")  # horizontal whitespace: any whitespace but newline
_BLANK_LINES = re.compile(r"\n\s*\n")


def normalise_whitespace(text: str) -> str:
    """NFC-normalise, collapse runs of spaces/tabs, strip every line, keep at most one blank line.

    NFC first so that the same word typed with combining accents or precomposed letters is the same
    string for de-duplication and for the tokenizer.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are blocks separated by blank lines; each comes back whitespace-normalised."""
    return [p for p in (normalise_whitespace(block) for block in _BLANK_LINES.split(text)) if p]


def drop_duplicates(paragraphs: Iterable[str], seen: set[str]) -> list[str]:
    """Keep the first occurrence of each paragraph across everything that shares `seen`.

    Translations repeat boilerplate (translator credits, licence notes) on every page; keeping it
    would teach the model the footer, not the language.
    """
    kept = []
    for paragraph in paragraphs:
        key = normalise_whitespace(paragraph)
        if key not in seen:
            seen.add(key)
            kept.append(paragraph)
    return kept


# --- script and language ---------------------------------------------------------------------


def script_fractions(text: str) -> tuple[float, float]:
    """(Latin, Cyrillic) share of the letters in `text`; (0, 0) when it has no letters."""
    latin = cyrillic = other = 0
    for ch in text:
        if not ch.isalpha():
            continue
        if ch < "\u0250":  # Basic Latin .. Latin Extended-B covers fr/it/en accents
            latin += 1
        elif "\u0400" <= ch <= "\u04ff":
            cyrillic += 1
        else:
            other += 1
    total = latin + cyrillic + other
    return (latin / total, cyrillic / total) if total else (0.0, 0.0)


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Frequent function words that belong to one language of each script group only: words shared by
# two candidates ("le", "si", "in", "come", "на", "не", "так") would blur exactly the contrasts we need.
_STOPWORDS: dict[str, frozenset[str]] = {
    "en": _wordset(
        "the and of to is that for it with as are this be by from an which can if will you when was "
        "have has its these they their at but only use used should would must than then there more "
        "into other also such each any does do not or"
    ),
    "fr": _wordset(
        "les des du de et est une pour dans qui que sur par pas sont avec cette ou au aux être "
        "été peut plus leur vous nous sans lorsque elle ces fichier fichiers également"
    ),
    "it": _wordset(
        "di che è e per del della delle dei degli una sono con da dal alla alle nel nella questo "
        "questa anche essere può viene gli ed quando più sia tutti oppure"
    ),
    "uk": _wordset(
        "і й та що це як є від або його цей ця ці бути який яка які також якщо щоб чи вони буде "
        "можна ви ваш цього після зі із тільки лише було має свій"
    ),
    "ru": _wordset(
        "и что это как или если его он она они с со из от также только может быть был этот эта "
        "эти который которые которая будет можно вы к о"
    ),
}
_LATIN_LANGS = ("en", "fr", "it")
_CYRILLIC_LANGS = ("uk", "ru")
# Letters that exist in one of the two Cyrillic alphabets only; they separate uk/ru even in a
# paragraph with few function words (e.g. a list of options).
_DISTINCT_LETTERS = {"uk": frozenset("іїєґ"), "ru": frozenset("ыэъё")}
_WORD = re.compile(r"[^\W\d_]+")


def detect_language(text: str) -> str | None:
    """Best guess among en/fr/it/uk/ru, or None when the text carries no evidence (code, names).

    Script decides the candidate group, then function-word hits (plus, for Cyrillic, letters
    unique to Ukrainian or Russian) pick the language; a tie is no evidence.
    """
    latin, cyrillic = script_fractions(text)
    if latin == cyrillic == 0.0:
        return None
    candidates = _CYRILLIC_LANGS if cyrillic > latin else _LATIN_LANGS
    lowered = text.lower()
    words = _WORD.findall(lowered)
    scores: dict[str, int] = {lang: sum(w in _STOPWORDS[lang] for w in words) for lang in candidates}
    for lang, letters in _DISTINCT_LETTERS.items():
        if lang in scores:  # the other language never uses these letters: each counts like a word
            scores[lang] += sum(ch in letters for ch in lowered)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    best, best_score = ranked[0]
    if best_score <= 0 or best_score == ranked[1][1]:
        return None
    return best


def keep_language(paragraphs: Iterable[str], language: str) -> list[str]:
    """The paragraphs detected as `language`; untranslated English in translations is dropped."""
    return [p for p in paragraphs if detect_language(p) == language]


# --- markup ----------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_OVERSTRIKE = re.compile(r".\x08")


def strip_terminal_formatting(text: str) -> str:
    """Remove ANSI escape sequences and `x\\bx` / `_\\bx` overstrike (bold/underline) from tty text."""
    return _OVERSTRIKE.sub("", _ANSI.sub("", text))


# Elements whose content is never prose: page chrome, metadata (Mallard <info> holds credits and
# licences), terminal screens and media.
_DROP_ELEMENTS = re.compile(
    r"<(script|style|head|header|footer|nav|aside|info|media|svg|screen)\b.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_COMMENTS = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE[^>]*>", re.DOTALL | re.IGNORECASE)
_BLOCK_TAGS = re.compile(
    r"</?(p|div|h[1-6]|li|ul|ol|tr|td|th|table|br|title|item|section|note|list|terms|tree|"
    r"dt|dd|dl|pre|blockquote|paragraph|bookmark_value|tablecell|tablerow|listitem)\b[^>]*>",
    re.IGNORECASE,
)
_ANY_TAG = re.compile(r"<[^>]*>")


def strip_markup(text: str) -> str:
    """Plain text from HTML, LibreOffice XHP or Mallard XML: block elements become paragraphs."""
    text = _COMMENTS.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _BLOCK_TAGS.sub("\n\n", text)
    text = _ANY_TAG.sub("", text)
    return normalise_whitespace(html.unescape(text))


# roff: requests that start a new paragraph, and escapes mapped to the characters they print.
_ROFF_BREAKS = _wordset("PP P LP TP IP HP br sp RS RE TH EX EE nf fi")
_ROFF_FONT_MACROS = _wordset("B I R BI BR IB IR RB RI SM SB")
_ROFF_CHARS = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "bu": "•", "co": "©", "rg": "®", "hy": "-", "mi": "-", "pl": "+", "mu": "×", "<=": "≤",
    ">=": "≥", "->": "→", "Fo": "«", "Fc": "»", "ti": "~", "ha": "^", "rs": "\\", "ga": "`",
}  # fmt: skip
_ROFF_ESCAPE = re.compile(
    r"\\(?:\((?P<two>..)|\[(?P<named>[^\]]*)\]|\*(?:\(..|\[[^\]]*\]|.)|f(?:\(..|\[[^\]]*\]|.)"
    r"|s[-+]?\d+|[&c%:|^0 ]|(?P<lit>[-e\\.'`]))"
)


# \('e and friends: an accent then a letter, composed into one character.
_ROFF_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", "~": "\u0303", ",": "\u0327"}


def _roff_escape(match: re.Match[str]) -> str:
    name = match.group("two") or match.group("named")
    if name is not None and len(name) == 2 and name[0] in _ROFF_ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ROFF_ACCENTS[name[0]])
    if name is not None:
        return _ROFF_CHARS.get(name, "")
    literal = match.group("lit")
    return {"-": "-", "e": "\\", "\\": "\\", ".": ".", "'": "'", "`": "`"}.get(literal or "", "")


def _roff_macro_line(line: str) -> tuple[bool, str] | None:
    """(starts a paragraph, text it prints) for a macro line, e.g. `.B foo` -> (False, "foo");
    None for requests that print nothing we want (`.TH`, `.de`, `.if`, ...)."""
    parts = line[1:].strip().split(None, 1)
    if not parts:
        return None
    name, args = parts[0], (parts[1] if len(parts) > 1 else "")
    if name in ("SH", "SS"):
        return True, args.replace('"', "")
    if name in _ROFF_BREAKS:
        return True, ""
    if name in _ROFF_FONT_MACROS:
        return False, args.replace('"', "")
    return None


def strip_roff(source: str) -> str:
    """Rough plain text from man(7) roff, for machines without groff (groff renders better)."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            macro = _roff_macro_line(line)
            if macro is None:
                continue
            starts_paragraph, line = macro
            if starts_paragraph:
                out.append("")
        text = _ROFF_ESCAPE.sub(_roff_escape, line.split('\\"')[0])  # \" starts a comment
        if text.strip():
            out.append(text)
    return normalise_whitespace("\n".join(out))
