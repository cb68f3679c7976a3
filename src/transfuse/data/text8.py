"""TEXT-8: eight real text-classification tasks built from Debian packages.

=========================  ===============================================================  =======
task                       text -> label                                                    classes
=========================  ===============================================================  =======
fortunes_topic             an English fortune -> the ``fortunes`` file it comes from          8
fortunes_language          a fortune -> en / de / es / it                                     4
kjv_section                a King James Bible verse -> the section of its book                8
austen_novel               a 4-line passage -> one of Jane Austen's six novels                6
books_author               a 4-line passage -> Dickens / Austen / Wells / Verne               4
wordnet_supersense         a WordNet noun gloss -> one of 10 lexicographer files              10
wordnet_pos                a WordNet gloss -> noun / verb / adj / adv                          4
bing_sentiment             an English word -> positive / negative (Bing Liu's lexicon)        2
=========================  ===============================================================  =======

:func:`load_task_suite` ``("text8")`` reads the prepared copy committed in ``prepared/text8`` (standard
library only). :func:`build_text8` regenerates that copy, byte for byte, from the Debian packages
(``apt-get download`` + ``dpkg-deb -x`` into a cache, see :mod:`transfuse.data.debian`); it needs ``rdata``
(PyPI) for the R data and runs the ``bible`` program of ``bible-kjv`` (amd64) to print the verses.

Every builder returns *all* labelled texts of its source; :func:`build_text8` then removes duplicates
(whitespace-normalized; a text with two labels is dropped) and splits with
:func:`transfuse.data.splits.split_balanced`: test, validation and train capped at 500 / 500 / 2,000,
divided evenly among the classes, seeded.
"""

from __future__ import annotations

import re
import subprocess
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfuse.data.debian import package_version, prepare_packages
from transfuse.data.splits import SplitSizes, dedup_examples, normalize_text, split_balanced
from transfuse.data.task import (
    PREPARED_FORMAT_VERSION,
    SPLIT_NAMES,
    Task,
    TaskDataError,
    gzip_bytes,
    load_task_suite,
    manifest_bytes,
    sha256_bytes,
    task_jsonl_bytes,
)

__all__ = [
    "TEXT8_PACKAGES",
    "TEXT8_TASKS",
    "PREPARED_DIR",
    "SourceTask",
    "build_text8",
    "build_source_task",
    "load_task_suite",
]

#: Where the committed prepared copy lives (the default output of ``build_text8`` in a source checkout).
PREPARED_DIR = Path(__file__).resolve().parent / "prepared" / "text8"

#: The Debian packages the eight tasks are built from.
TEXT8_PACKAGES = (
    "fortunes",
    "fortunes-min",
    "fortunes-de",
    "fortunes-es",
    "fortunes-it",
    "wordnet-base",
    "bible-kjv",
    "bible-kjv-text",
    "r-cran-janeaustenr",
    "r-cran-tidytext",
)

SEED = 0
SIZES = SplitSizes(train=2000, validation=500, test=500)


@dataclass
class SourceTask:
    """Everything one builder read from its package(s): all labelled texts, before dedup and splitting."""

    name: str
    description: str
    label_names: list[str]
    examples: list[tuple[str, int]]
    packages: list[str]
    provenance: str
    licence: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# fortunes

FORTUNES_DIR = Path("usr/share/games/fortunes")
#: Longest fortune kept (characters, after whitespace normalization): longer ones are stories or
#: lists (about 1% of the entries) that a 48-token model sees only the start of.
MAX_FORTUNE_CHARS = 1000
#: Files of ASCII pictures, not text in a language.
NON_TEXT_FORTUNE_FILES = frozenset({"ascii-art", "asciiart"})

_OVERSTRIKE = re.compile(".\x08", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc except \t and \n


def clean_fortune(entry: str) -> str | None:
    """A fortune's text with overstrikes (``_\\bx``), escape sequences and control characters removed and
    whitespace normalized; ``None`` when nothing with a letter is left or it is too long."""
    text = _ANSI.sub("", entry)
    while "\x08" in text:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = _CONTROL.sub("", text)
    text = normalize_text(text)
    if not text or len(text) > MAX_FORTUNE_CHARS or not any(ch.isalpha() for ch in text):
        return None
    return text


def read_fortune_file(path: Path) -> list[str]:
    """The cleaned entries of one fortune file (entries end at a line holding only ``%``)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    entries, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [cleaned for cleaned in map(clean_fortune, entries) if cleaned]


def fortune_files(directory: Path) -> list[Path]:
    """The fortune text files directly in `directory`, sorted: regular files only (the top-level English
    directory has symlinks into ``it/``, and ``*.u8`` symlinks), no ``.dat`` indexes, no ASCII-art files."""
    if not directory.is_dir():
        raise TaskDataError(f"{directory} is missing: is the fortunes package extracted there?")
    return [
        p
        for p in sorted(directory.iterdir(), key=lambda p: p.name)
        if p.is_file()
        and not p.is_symlink()
        and p.suffix not in (".dat", ".u8")
        and p.name not in NON_TEXT_FORTUNE_FILES
    ]


FORTUNE_TOPICS = ("computers", "food", "law", "love", "medicine", "science", "sports", "startrek")


def build_fortunes_topic(root: Path) -> SourceTask:
    base = root / FORTUNES_DIR
    examples = []
    for label, topic in enumerate(FORTUNE_TOPICS):
        path = base / topic
        if not path.is_file() or path.is_symlink():
            raise TaskDataError(f"{path} is missing or not a regular file")
        examples += [(text, label) for text in read_fortune_file(path)]
    return SourceTask(
        name="fortunes_topic",
        description="English fortune -> the topic file it comes from",
        label_names=list(FORTUNE_TOPICS),
        examples=examples,
        packages=["fortunes"],
        provenance=(
            f"Debian package fortunes: {FORTUNES_DIR}/{{{','.join(FORTUNE_TOPICS)}}}; entries end at lines "
            f"'%'; overstrikes and control characters removed; entries over {MAX_FORTUNE_CHARS} characters "
            "or without a letter dropped"
        ),
        licence="BSD (fortune-mod; Debian package fortunes)",
        notes=["small source: classes under their even share are split in the same 2000:500:500 ratio"],
    )


FORTUNE_LANGUAGES = (
    ("en", "", ("fortunes", "fortunes-min")),
    ("de", "de", ("fortunes-de",)),
    ("es", "es", ("fortunes-es",)),
    ("it", "it", ("fortunes-it",)),
)


def build_fortunes_language(root: Path) -> SourceTask:
    base = root / FORTUNES_DIR
    examples = []
    for label, (_, subdir, _) in enumerate(FORTUNE_LANGUAGES):
        for path in fortune_files(base / subdir if subdir else base):
            examples += [(text, label) for text in read_fortune_file(path)]
    return SourceTask(
        name="fortunes_language",
        description="fortune -> language (en / de / es / it)",
        label_names=[lang for lang, _, _ in FORTUNE_LANGUAGES],
        examples=examples,
        packages=["fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it"],
        provenance=(
            f"Debian packages fortunes + fortunes-min (en: regular files in {FORTUNES_DIR}, symlinks into "
            f"it/ skipped), fortunes-de ({FORTUNES_DIR}/de), fortunes-es ({FORTUNES_DIR}/es), fortunes-it "
            f"({FORTUNES_DIR}/it); ascii-art files skipped; same cleaning as fortunes_topic"
        ),
        licence=(
            "en: BSD (fortunes, fortunes-min); de: GPL-2+ (fortunes-de); es: fortunes presumed public "
            "domain, packaging GPL-2+ (fortunes-es); it: freeware / public domain (fortunes-it)"
        ),
        notes=["the English collection quotes some German/Spanish/Italian lines: a few labels are noisy"],
    )


# --------------------------------------------------------------------------------------------------------
# King James Bible

KJV_SECTIONS = (
    ("law", "Ge Exo Lev Num Deu"),
    ("history", "Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est"),
    ("wisdom", "Job Psa Prv Eccl SSol"),
    ("major_prophets", "Isa Jer Lam Eze Dan"),
    ("minor_prophets", "Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal"),
    ("gospels_acts", "Mat Mark Luke John Acts"),
    ("pauline_epistles", "Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn"),
    ("general_epistles_revelation", "Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev"),
)
#: Book abbreviation (as the ``bible`` program prints it) -> section id.
KJV_BOOK_SECTION = {book: i for i, (_, books) in enumerate(KJV_SECTIONS) for book in books.split()}
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_verses(root: Path) -> list[tuple[str, int, int, str]]:
    """All verses as ``(book, chapter, verse, text)``, printed by bible-kjv's ``bible`` program from the
    bible-kjv-text data (``usr/lib/bible.data``), run from the extracted tree without installing it."""
    program, data_dir = (root / "usr/bin/bible").absolute(), root / "usr/lib"
    if not program.is_file() or not (data_dir / "bible.data").is_file():
        raise TaskDataError(f"{program} or {data_dir / 'bible.data'} is missing: extract bible-kjv(-text)")
    cmd = [str(program), "-f", "-p", ".", "-l", "100000", "Gen1:1-Rev22:21"]
    try:
        done = subprocess.run(cmd, cwd=data_dir, capture_output=True, check=False)
    except OSError as exc:
        raise TaskDataError(
            f"cannot run {program} ({exc}); it is an amd64 program needing libreadline8"
        ) from None
    if done.returncode != 0:
        raise TaskDataError(f"{program} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    verses: list[tuple[str, int, int, str]] = []
    for line in done.stdout.decode("utf-8", errors="replace").splitlines():
        match = _VERSE.match(line)
        if match:
            book, chapter, verse, text = match.groups()
            verses.append((book, int(chapter), int(verse), text))
        elif line.strip() and verses:  # a wrapped line: part of the previous verse
            book, chapter, verse, text = verses[-1]
            verses[-1] = (book, chapter, verse, f"{text} {line.strip()}")
    return verses


def build_kjv_section(root: Path) -> SourceTask:
    examples = []
    for book, chapter, verse, text in kjv_verses(root):
        if book not in KJV_BOOK_SECTION:
            raise TaskDataError(f"unknown book abbreviation {book!r} at {book}{chapter}:{verse}")
        examples.append((text, KJV_BOOK_SECTION[book]))
    return SourceTask(
        name="kjv_section",
        description="King James Bible verse -> section of its book",
        label_names=[name for name, _ in KJV_SECTIONS],
        examples=examples,
        packages=["bible-kjv", "bible-kjv-text"],
        provenance=(
            "Debian packages bible-kjv + bible-kjv-text: `usr/bin/bible -f -p . -l 100000 Gen1:1-Rev22:21` "
            "run in usr/lib of the extracted tree; verse text without its reference. Sections: "
            + "; ".join(f"{name}: {books}" for name, books in KJV_SECTIONS)
        ),
        licence="KJV text public domain; bible-kjv program GPL-2+",
        notes=["Hebrews is counted with the general epistles, not with Paul's"],
    )


# --------------------------------------------------------------------------------------------------------
# R data (janeaustenr, tidytext)

R_LIBRARY = Path("usr/lib/R/site-library")


def _rdata() -> Any:
    try:
        import rdata
    except ImportError as exc:
        raise TaskDataError(
            "building the R-based TEXT-8 tasks needs the 'rdata' package: pip install rdata"
        ) from exc
    return rdata


def _parse_r(data: bytes) -> Any:
    rdata = _rdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lazy-load block is a bare serialization: "assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_lazyload_object(data_dir: Path, name: str, basename: str = "Rdata") -> Any:
    """One object of an R lazy-load database (``BASENAME.rdb`` + ``.rdx``), converted by ``rdata``.

    The ``.rdx`` index maps names to ``(offset, length)`` blocks of the ``.rdb``; a block is a 4-byte
    big-endian uncompressed length and a zlib stream (``compressed = TRUE``), or for ``compressed = 2/3``
    a codec byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none) before the payload.
    """
    index = _parse_r((data_dir / f"{basename}.rdx").read_bytes())
    variables = index["variables"]
    if name not in variables:
        raise TaskDataError(f"{data_dir}/{basename}.rdb has no object {name!r}; it has {sorted(variables)}")
    offset, length = (int(v) for v in variables[name])
    with (data_dir / f"{basename}.rdb").open("rb") as f:
        f.seek(offset)
        block = f.read(length)
    size = int.from_bytes(block[:4], "big")
    compressed = int(_scalar(index.get("compressed", 1)))
    if compressed == 1:
        payload = zlib.decompress(block[4:])
    else:
        codec, body = block[4:5], block[5:]
        if codec == b"Z":
            payload = zlib.decompress(body)
        elif codec == b"2":
            import bz2

            payload = bz2.decompress(body)
        elif codec == b"X":
            import lzma

            payload = lzma.decompress(body)
        elif codec == b"0":
            payload = body
        else:
            raise TaskDataError(f"{data_dir}/{basename}.rdb: unknown block codec {codec!r} for {name!r}")
    if len(payload) != size:
        raise TaskDataError(
            f"{data_dir}/{basename}.rdb: {name!r} is {len(payload)} bytes, header says {size}"
        )
    return _parse_r(payload)


def _scalar(value: Any) -> Any:
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


_CHAPTER_START = re.compile(r"^\s*chapter\b", re.IGNORECASE)
_CHAPTER_HEADING = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlcdm]+|[a-z]+(-[a-z]+)?)\.?\s*$", re.IGNORECASE)


def text_passages(lines: Sequence[str], size: int = 4) -> list[str]:
    """Consecutive groups of `size` text lines of a book, joined by spaces.

    The book starts at its first chapter heading (the title, byline, editor's notes and preface before it
    are dropped: "by Charles Dickens" would give the author away); chapter headings, blank lines and lines
    without a lowercase letter (``VOLUME I``, ``* * *``) are skipped; an incomplete last group is dropped.
    """
    lines = ["" if line is None else str(line) for line in lines]
    start = next((i for i, line in enumerate(lines) if _CHAPTER_START.match(line)), 0)
    kept = [
        line.strip()
        for line in lines[start:]
        if any(ch.islower() for ch in line) and not _CHAPTER_HEADING.match(line)
    ]
    return [" ".join(kept[i : i + size]) for i in range(0, len(kept) - size + 1, size)]


AUSTEN_NOVELS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)


def build_austen_novel(root: Path) -> SourceTask:
    data_dir = root / R_LIBRARY / "janeaustenr" / "data"
    examples = []
    for label, (obj, _) in enumerate(AUSTEN_NOVELS):
        lines = [str(x) for x in read_lazyload_object(data_dir, obj)]
        examples += [(p, label) for p in text_passages(lines)]
    return SourceTask(
        name="austen_novel",
        description="4-line passage -> which of Jane Austen's six novels",
        label_names=[title for _, title in AUSTEN_NOVELS],
        examples=examples,
        packages=["r-cran-janeaustenr"],
        provenance=(
            f"Debian package r-cran-janeaustenr: R lazy-load database {R_LIBRARY}/janeaustenr/data/Rdata.rdb, "
            f"objects {', '.join(o for o, _ in AUSTEN_NOVELS)} (one character vector of lines per novel); "
            "passages = 4 consecutive text lines from the first chapter heading on (headings, blank lines and "
            "lines without a lowercase letter skipped), joined"
        ),
        licence="novels public domain (Project Gutenberg); janeaustenr package MIT",
    )


BOOKS = (  # gutenberg_id, title in the data, author label
    (1400, "Great Expectations", "Dickens"),
    (1342, "Pride and Prejudice", "Austen"),
    (36, "The War of the Worlds", "Wells"),
    (164, "Twenty Thousand Leagues under the Sea", "Verne"),
)


def build_books_author(root: Path) -> SourceTask:
    path = root / R_LIBRARY / "tidytext" / "extdata" / "books.rda"
    if not path.is_file():
        raise TaskDataError(f"{path} is missing: extract r-cran-tidytext")
    rdata = _rdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = rdata.read_rda(path)["books"]
    ids = [int(v) for v in frame["gutenberg_id"]]
    texts = ["" if v is None or v != v else str(v) for v in frame["text"]]
    titles = [str(v) for v in frame["title"]]
    examples = []
    for label, (gid, title, _) in enumerate(BOOKS):
        rows = [i for i, g in enumerate(ids) if g == gid]
        if not rows:
            raise TaskDataError(f"{path}: no lines of gutenberg_id {gid} ({title})")
        if {titles[i] for i in rows} != {title}:
            raise TaskDataError(f"{path}: gutenberg_id {gid} is not {title!r}")
        examples += [(p, label) for p in text_passages([texts[i] for i in rows])]
    return SourceTask(
        name="books_author",
        description="4-line passage -> author (Dickens / Austen / Wells / Verne)",
        label_names=[author for _, _, author in BOOKS],
        examples=examples,
        packages=["r-cran-tidytext"],
        provenance=(
            f"Debian package r-cran-tidytext: {R_LIBRARY}/tidytext/extdata/books.rda (data frame `books`: "
            + "; ".join(f"{t} (Gutenberg {g}) -> {a}" for g, t, a in BOOKS)
            + "); passages as in austen_novel"
        ),
        licence="books public domain (Project Gutenberg); tidytext package MIT",
        notes=[
            "one book per author, so author and book are confounded; Pride and Prejudice is also in austen_novel"
        ],
    )


def build_bing_sentiment(root: Path) -> SourceTask:
    frame = read_lazyload_object(root / R_LIBRARY / "tidytext" / "data", "sentiments")
    names = ["positive", "negative"]
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for word, sentiment in zip(frame["word"], frame["sentiment"]):
        if str(sentiment) not in index:
            raise TaskDataError(f"tidytext sentiments: unexpected sentiment {sentiment!r} for {word!r}")
        examples.append((str(word), index[str(sentiment)]))
    return SourceTask(
        name="bing_sentiment",
        description="English word -> positive / negative (Bing Liu's opinion lexicon)",
        label_names=names,
        examples=examples,
        packages=["r-cran-tidytext"],
        provenance=(
            f"Debian package r-cran-tidytext: R lazy-load database {R_LIBRARY}/tidytext/data/Rdata.rdb, object "
            "`sentiments` (word, sentiment): the lexicon of Hu & Liu, 'Mining and summarizing customer "
            "reviews', KDD 2004"
        ),
        licence=(
            "Bing Liu's opinion lexicon, included in tidytext with the creators' permission; usable in research "
            "and commercial contexts with attribution (Hu & Liu, KDD 2004); tidytext package MIT"
        ),
        notes=["words listed as both positive and negative are dropped"],
    )


# --------------------------------------------------------------------------------------------------------
# WordNet

WORDNET_DIR = Path("usr/share/wordnet")
WORDNET_POS = (("noun", "noun"), ("verb", "verb"), ("adj", "adj"), ("adv", "adv"))
#: Supersense label -> WordNet lexicographer file number (lexnames: noun.animal = 05, ...).
SUPERSENSES = (
    ("animal", 5),
    ("plant", 20),
    ("food", 13),
    ("person", 18),
    ("artifact", 6),
    ("location", 15),
    ("body", 8),
    ("substance", 27),
    ("time", 28),
    ("feeling", 12),
)


def wordnet_synsets(root: Path, pos: str) -> list[tuple[int, str]]:
    """``(lexicographer file number, gloss)`` of every synset in ``data.POS`` (licence header skipped)."""
    path = root / WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise TaskDataError(f"{path} is missing: extract wordnet-base")
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" "):
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                raise TaskDataError(f"{path}: synset line without a gloss: {line[:60]!r}")
            out.append((int(head.split()[1]), gloss.strip()))
    return out


def build_wordnet_supersense(root: Path) -> SourceTask:
    label_of = {lexfile: i for i, (_, lexfile) in enumerate(SUPERSENSES)}
    examples = [(gloss, label_of[lex]) for lex, gloss in wordnet_synsets(root, "noun") if lex in label_of]
    return SourceTask(
        name="wordnet_supersense",
        description="WordNet noun gloss -> lexicographer file (supersense), 10 of them",
        label_names=[name for name, _ in SUPERSENSES],
        examples=examples,
        packages=["wordnet-base"],
        provenance=(
            f"Debian package wordnet-base: {WORDNET_DIR}/data.noun; text = the gloss (definition and examples); "
            "label = lex_filenum: " + ", ".join(f"noun.{n} ({f:02d})" for n, f in SUPERSENSES)
        ),
        licence="WordNet 3.0 licence (Princeton University; free use, with its copyright notice)",
    )


def build_wordnet_pos(root: Path) -> SourceTask:
    examples = []
    for label, (_, pos) in enumerate(WORDNET_POS):
        examples += [(gloss, label) for _, gloss in wordnet_synsets(root, pos)]
    return SourceTask(
        name="wordnet_pos",
        description="WordNet gloss -> part of speech of its synset (noun / verb / adj / adv)",
        label_names=[name for name, _ in WORDNET_POS],
        examples=examples,
        packages=["wordnet-base"],
        provenance=(
            f"Debian package wordnet-base: {WORDNET_DIR}/data.{{noun,verb,adj,adv}} (adjective satellites "
            "count as adj); text = the gloss"
        ),
        licence="WordNet 3.0 licence (Princeton University; free use, with its copyright notice)",
        notes=["glosses shared by two parts of speech are dropped"],
    )


# --------------------------------------------------------------------------------------------------------
# The suite

BUILDERS: dict[str, Callable[[Path], SourceTask]] = {
    "fortunes_topic": build_fortunes_topic,
    "fortunes_language": build_fortunes_language,
    "kjv_section": build_kjv_section,
    "austen_novel": build_austen_novel,
    "books_author": build_books_author,
    "wordnet_supersense": build_wordnet_supersense,
    "wordnet_pos": build_wordnet_pos,
    "bing_sentiment": build_bing_sentiment,
}
TEXT8_TASKS = tuple(BUILDERS)


def build_source_task(
    source: SourceTask, *, seed: int = SEED, sizes: SplitSizes = SIZES
) -> tuple[Task, dict[str, Any]]:
    """Dedup and split a builder's output; return the task and its manifest entry (without the file)."""
    examples, report = dedup_examples(source.examples)
    available = [0] * len(source.label_names)
    for e in examples:
        available[e.label] += 1
    empty = [source.label_names[c] for c, n in enumerate(available) if n == 0]
    if empty:
        raise TaskDataError(
            f"{source.name}: no examples of {empty} (is the right package version extracted?)"
        )
    parts = split_balanced(examples, len(source.label_names), sizes=sizes, seed=seed)
    task = Task(
        name=source.name,
        label_names=source.label_names,
        provenance=source.provenance,
        licence=source.licence,
        description=source.description,
        **parts,
    )
    entry = {
        "name": source.name,
        "description": source.description,
        "label_names": list(source.label_names),
        "counts": {split: len(parts[split]) for split in SPLIT_NAMES},
        "class_counts": {split: task.class_counts(split) for split in SPLIT_NAMES},
        "source": {"dedup": report.as_dict(), "available_per_class": available},
        "packages": list(source.packages),
        "provenance": source.provenance,
        "licence": source.licence,
        "notes": list(source.notes),
    }
    return task, entry


def build_text8(
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    package_root: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the TEXT-8 prepared copy into `out_dir`: ``manifest.json`` + ``TASK.jsonl.gz`` per task.

    The packages are fetched with ``apt-get download`` into `cache_dir` (default
    :func:`transfuse.data.debian.default_cache_dir`) and extracted there, unless `package_root` points at a
    tree where they are already extracted (e.g. ``/`` on a system that has them installed, or a test
    fixture). `tasks` builds only some tasks (the manifest then lists only those). The output is
    deterministic: building twice from the same package versions gives the same bytes. Every file is built
    in memory before any is written; other files already in `out_dir` are left alone. `log` receives
    progress lines. Returns the manifest. Takes about 15 s (plus the download) on 2 cores, most of it
    ``rdata`` parsing the R data.
    """
    names = list(TEXT8_TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise TaskDataError(f"unknown TEXT-8 tasks {unknown}; tasks: {', '.join(TEXT8_TASKS)}")
    say = log or (lambda message: None)
    started = time.perf_counter()
    if package_root is None:
        say(f"fetching and extracting {len(TEXT8_PACKAGES)} Debian packages")
        root = prepare_packages(TEXT8_PACKAGES, cache_dir)
    else:
        root = Path(package_root)
    files: dict[str, bytes] = {}  # everything is built before anything is written
    entries, used_packages = [], set()
    for name in names:
        task, entry = build_source_task(BUILDERS[name](root))
        file_name = f"{name}.jsonl.gz"
        files[file_name] = gzip_bytes(task_jsonl_bytes(task))
        entry.update(file=file_name, sha256=sha256_bytes(files[file_name]))
        entries.append(entry)
        used_packages.update(entry["packages"])
        counts = entry["counts"]
        say(
            f"{name}: {task.num_classes} classes, train {counts['train']} / validation "
            f"{counts['validation']} / test {counts['test']}"
        )
    manifest = {
        "suite": "text8",
        "format_version": PREPARED_FORMAT_VERSION,
        "builder": "transfuse.data.text8.build_text8",
        "seed": SEED,
        "split_sizes": SIZES.as_dict(),
        "split_rule": (
            "exact duplicates removed after whitespace normalization (texts with two labels dropped); "
            "per split the size is divided evenly among the classes, a class with fewer examples than "
            "its three shares is divided in the same ratio; within a class test is taken first, then "
            "validation, then train, in the order of sha256(f'select\\x00{seed}\\x00{text}'); each "
            "split is stored in the order of sha256(f'shuffle\\x00{seed}\\x00{text}')"
        ),
        "packages": {p: package_version(root, p) for p in TEXT8_PACKAGES if p in used_packages},
        "tasks": entries,
    }
    files["manifest.json"] = manifest_bytes(manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        (out / file_name).write_bytes(data)
    say(f"wrote {len(entries)} tasks to {out} in {time.perf_counter() - started:.1f} s")
    return manifest
