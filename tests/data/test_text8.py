"""TEXT-8: the committed prepared copy, the builders on fixture trees, and a rebuild from the real packages."""

from __future__ import annotations

import ast
import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import urllib.parse
import zlib
from pathlib import Path

import pytest

from transfuse.data import (
    TEXT8_PACKAGES,
    TEXT8_PREPARED_DIR,
    TEXT8_TASKS,
    TaskDataError,
    build_text8,
    load_task_suite,
    normalize_text,
)
from transfuse.data.debian import DebianPackageError, cached_debs, default_cache_dir, package_version
from transfuse.data.splits import even_shares, proportional_counts
from transfuse.data.text8 import clean_fortune, read_lazyload_object, text_passages

FIXTURE_ROOT = Path(__file__).resolve().parent / "fixtures" / "text8_root"
SPLITS = ("train", "validation", "test")

LABELS = {
    "fortunes_topic": ["computers", "food", "law", "love", "medicine", "science", "sports", "startrek"],
    "fortunes_language": ["en", "de", "es", "it"],
    "kjv_section": [
        "law",
        "history",
        "wisdom",
        "major_prophets",
        "minor_prophets",
        "gospels_acts",
        "pauline_epistles",
        "general_epistles_revelation",
    ],
    "austen_novel": [
        "Sense & Sensibility",
        "Pride & Prejudice",
        "Mansfield Park",
        "Emma",
        "Northanger Abbey",
        "Persuasion",
    ],
    "books_author": ["Dickens", "Austen", "Wells", "Verne"],
    "wordnet_supersense": [
        "animal",
        "plant",
        "food",
        "person",
        "artifact",
        "location",
        "body",
        "substance",
        "time",
        "feeling",
    ],
    "wordnet_pos": ["noun", "verb", "adj", "adv"],
    "bing_sentiment": ["positive", "negative"],
}


@pytest.fixture(scope="module")
def suite():
    return load_task_suite("text8")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((TEXT8_PREPARED_DIR / "manifest.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# The committed prepared copy


def test_suite_has_the_eight_tasks_with_their_classes(suite):
    assert suite.name == "text8"
    assert suite.names == list(TEXT8_TASKS) == list(LABELS)
    for task in suite:
        assert task.label_names == LABELS[task.name]
        assert task.provenance and task.licence and task.description


def test_manifest_matches_files(suite, manifest):
    files = {p.name for p in TEXT8_PREPARED_DIR.iterdir()}
    assert files == {"manifest.json"} | {e["file"] for e in manifest["tasks"]}
    assert set(manifest["packages"]) == set(TEXT8_PACKAGES)
    for entry in manifest["tasks"]:
        data = (TEXT8_PREPARED_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        task = suite[entry["name"]]
        assert entry["label_names"] == task.label_names
        assert entry["counts"] == {s: len(task.split(s)) for s in SPLITS}
        assert entry["class_counts"] == {s: task.class_counts(s) for s in SPLITS}
        assert entry["licence"] == task.licence and entry["provenance"] == task.provenance
        assert set(entry["packages"]) <= set(TEXT8_PACKAGES)


def test_label_ids_contiguous_every_class_in_every_split(suite):
    for task in suite:
        for split in SPLITS:
            assert sorted({e.label for e in task.split(split)}) == list(range(task.num_classes)), (
                task.name,
                split,
            )


def test_splits_disjoint_normalized_without_duplicates(suite):
    for task in suite:
        seen: set[str] = set()
        for split in SPLITS:
            texts = task.texts(split)
            assert len(texts) == len(set(texts)), (task.name, split)
            assert not seen & set(texts), f"{task.name}: a {split} text is in an earlier split"
            seen |= set(texts)
            assert all(t == normalize_text(t) and t for t in texts)


def test_sizes_and_class_balance(suite, manifest):
    sizes = manifest["split_sizes"]
    assert sizes == {"train": 2000, "validation": 500, "test": 500}
    for entry in manifest["tasks"]:
        task = suite[entry["name"]]
        available = entry["source"]["available_per_class"]
        shares = {s: even_shares(sizes[s], available) for s in SPLITS}
        for c, n in enumerate(available):
            wanted = [shares["test"][c], shares["validation"][c], shares["train"][c]]
            expected = wanted if n >= sum(wanted) else proportional_counts(n, wanted)
            got = [task.class_counts(s)[c] for s in ("test", "validation", "train")]
            assert got == expected, (task.name, c)
        if task.name != "fortunes_topic":
            assert [len(task.split(s)) for s in SPLITS] == [2000, 500, 500]
            for split in SPLITS:
                counts = task.class_counts(split)
                assert max(counts) - min(counts) <= 1, (task.name, split, counts)
    small = suite["fortunes_topic"]
    assert [len(small.split(s)) for s in SPLITS] == [1157, 290, 291]


def test_task_selection_and_max_train(suite):
    picked = load_task_suite("text8", tasks=["bing_sentiment", "kjv_section"], max_train=100)
    assert picked.names == ["bing_sentiment", "kjv_section"]
    assert picked["bing_sentiment"].class_counts("train") == [50, 50]
    assert picked["kjv_section"].class_counts("train") == [13, 13, 13, 13, 12, 12, 12, 12]
    assert picked["kjv_section"].test == suite["kjv_section"].test
    assert set(picked["kjv_section"].train) <= set(suite["kjv_section"].train)
    with pytest.raises(KeyError, match="no task"):
        load_task_suite("text8", tasks=["nope"])


def test_corrupt_prepared_copy_is_detected(tmp_path):
    copy = tmp_path / "text8"
    shutil.copytree(TEXT8_PREPARED_DIR, copy)
    target = copy / "bing_sentiment.jsonl.gz"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(TaskDataError, match="sha256"):
        load_task_suite(copy)
    assert load_task_suite(copy, tasks=["kjv_section"]).names == ["kjv_section"]


def test_loading_the_prepared_copy_needs_only_the_standard_library(monkeypatch):
    # No module of transfuse.data imports anything but the standard library at import time ...
    import transfuse.data

    package_dir = Path(transfuse.data.__file__).parent
    for source in sorted(package_dir.glob("*.py")):
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("transfuse", "__future__"), (
                    source.name,
                    module,
                )
    # ... and loading the prepared copy imports no data package lazily either.
    for blocked in ("rdata", "pandas", "numpy", "xarray", "datasets"):
        monkeypatch.setitem(sys.modules, blocked, None)
    assert len(load_task_suite("text8")) == 8


# ---------------------------------------------------------------------------------------------------------
# Builders on fixture trees (tests/data/fixtures/text8_root, made by make_fixtures.py)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgroot") / "root"
    shutil.copytree(FIXTURE_ROOT, root, symlinks=True)
    (root / "usr/bin/bible").chmod(0o755)  # in case a checkout dropped the executable bit
    return root


R_TASKS = ("austen_novel", "books_author", "bing_sentiment")
try:
    import rdata  # noqa: F401

    FIXTURE_TASKS = list(TEXT8_TASKS)
except ImportError:  # the R-based builders need rdata; the others are tested without it
    FIXTURE_TASKS = [name for name in TEXT8_TASKS if name not in R_TASKS]


@pytest.fixture(scope="module")
def fixture_build(fixture_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    manifest = build_text8(out, package_root=fixture_root, tasks=FIXTURE_TASKS)
    return out, manifest, load_task_suite(out)


EXPECTED_KEPT = {
    "fortunes_topic": 33,
    "fortunes_language": 42,
    "kjv_section": 18,
    "austen_novel": 18,
    "books_author": 8,
    "wordnet_supersense": 20,
    "wordnet_pos": 28,
    "bing_sentiment": 6,
}


def all_examples(task):
    return {(e.text, task.label_names[e.label]) for s in SPLITS for e in task.split(s)}


def test_fixture_build_writes_manifest_and_files(fixture_build):
    out, manifest, built = fixture_build
    assert built.names == FIXTURE_TASKS
    assert {p.name for p in out.iterdir()} == {"manifest.json"} | {f"{n}.jsonl.gz" for n in FIXTURE_TASKS}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert set(manifest["packages"].values()) == {"unknown"}  # the fixture has no changelogs
    kept = {e["name"]: e["source"]["dedup"]["kept"] for e in manifest["tasks"]}
    assert kept == {name: n for name, n in EXPECTED_KEPT.items() if name in FIXTURE_TASKS}
    for task in built:
        assert sum(len(task.split(s)) for s in SPLITS) == kept[task.name]
        texts = [t for s in SPLITS for t in task.texts(s)]
        assert len(texts) == len(set(texts))


def test_fixture_build_is_deterministic(fixture_root, fixture_build, tmp_path):
    out, _, _ = fixture_build
    build_text8(tmp_path, package_root=fixture_root, tasks=FIXTURE_TASKS)
    for path in out.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    with gzip.open(out / "kjv_section.jsonl.gz") as f:
        first = json.loads(f.readline())
    assert list(first) == ["label", "split", "text"]
    header = (out / "kjv_section.jsonl.gz").read_bytes()[:10]
    assert header[4:8] == b"\0\0\0\0"  # gzip mtime 0


def test_fortunes_builders(fixture_build):
    built = fixture_build[2]
    topic = all_examples(built["fortunes_topic"])
    assert ("This is important: always back up.", "computers") in topic  # overstrike removed
    assert ("A computers fortune number 0. -- Someone on computers", "computers") in topic
    shared = "Any sufficiently advanced technology is indistinguishable from magic."
    assert not any(text == shared for text, _ in topic)  # in computers and science: dropped
    assert all(len(text) <= 1000 and any(ch.isalpha() for ch in text) for text, _ in topic)
    language = all_examples(built["fortunes_language"])
    assert ("Chi va piano va sano e va lontano.", "it") in language  # only via it/, not the en symlink
    assert ("Übung macht den Meister.", "de") in language  # latin-1 file decoded
    assert (shared, "en") in language
    assert not any("Bild aus Zeichen" in text or "a cat" in text for text, _ in language)  # ascii art
    assert not any(text.startswith("Das ist ein deutscher Satz") for text, _ in language)  # en and de
    counts = [sum(1 for _, lab in language if lab == lang) for lang in ("en", "de", "es", "it")]
    assert counts == [35, 3, 2, 2]


def test_kjv_builder(fixture_build):
    kjv = all_examples(fixture_build[2]["kjv_section"])
    assert ("Hear, O Israel: The LORD our God is one LORD:", "law") in kjv  # wrapped line joined
    assert ("Thou shalt not kill.", "law") in kjv
    assert ("The grace of our Lord Jesus Christ be with your spirit. Amen.", "pauline_epistles") in kjv
    faith = "Now faith is the substance of things hoped for, the evidence of things not seen."
    assert (faith, "general_epistles_revelation") in kjv  # Hebrews
    assert ("Now the LORD had prepared a great fish to swallow up Jonah.", "minor_prophets") in kjv
    assert not any(text == "Amen." for text, _ in kjv)


def test_build_rejects_unknown_tasks(tmp_path):
    with pytest.raises(TaskDataError, match="unknown TEXT-8 tasks"):
        build_text8(tmp_path, package_root=tmp_path, tasks=["kjv_section", "nope"])
    assert not any(tmp_path.iterdir())


def test_kjv_unknown_book_is_an_error(fixture_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(fixture_root / "usr/bin", root / "usr/bin")
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/bible.data").write_text("Tobit1:1 The book of the words of Tobit.\n")
    from transfuse.data.text8 import build_kjv_section

    with pytest.raises(TaskDataError, match="unknown book abbreviation 'Tobit'"):
        build_kjv_section(root)


def test_r_builders(fixture_build):
    pytest.importorskip("rdata")
    built = fixture_build[2]
    austen = all_examples(built["austen_novel"])
    assert len(austen) == 18
    assert not any(word in text for text, _ in austen for word in ("CHAPTER", "Chapter", "EMMA", "Writer"))
    emma = [text for text, label in austen if label == "Emma"]
    assert len(emma) == 3 and all("of Emma," in text for text in emma)
    books = all_examples(built["books_author"])
    assert {label for _, label in books} == {"Dickens", "Austen", "Wells", "Verne"}
    assert all(("Great Expectations" in text) == (label == "Dickens") for text, label in books)
    assert all(("Twenty Thousand Leagues" in text) == (label == "Verne") for text, label in books)
    bing = all_examples(built["bing_sentiment"])
    assert bing == {
        ("2-faces", "negative"),
        ("abnormal", "negative"),
        ("awful", "negative"),
        ("good", "positive"),
        ("great", "positive"),
        ("kind", "positive"),
    }


def test_wordnet_builders(fixture_build):
    built = fixture_build[2]
    supersense = all_examples(built["wordnet_supersense"])
    assert len(supersense) == 20
    assert all(text == f"a {label} kind of thing number {text[-1]}" for text, label in supersense)
    pos = all_examples(built["wordnet_pos"])
    assert ("express in words", "verb") in pos and ("dead; departed", "adj") in pos
    assert ('take in solid food; "she ate a banana"', "verb") in pos
    assert ("to a high degree", "adv") in pos
    assert not any(text == "move fast on foot" for text, _ in pos)  # noun and verb
    assert not any("not a synset" in text for text, _ in pos)  # licence header skipped


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_clean_fortune_and_text_passages():
    assert (
        clean_fortune("_\bb_\bo_\bl_\bd and \x1b[1mloud\x1b[0m\x07 text\n\t-- me")
        == "bold and loud text -- me"
    )
    assert clean_fortune("12345 %%%") is None
    assert clean_fortune("x" * 1001) is None
    lines = ["TITLE", "by Someone", "Chapter I", "one line here", "CHAPTER II", "two", "Chapter 3.", "three"]
    lines += ["", "four", "five", "* * *"]
    assert text_passages(lines, size=2) == ["one line here two", "three four"]
    assert text_passages(["no heading", "at all"], size=2) == ["no heading at all"]


@pytest.mark.parametrize("codec", [b"Z", b"2", b"X", b"0"])
def test_lazyload_codecs(fixture_root, tmp_path, codec):
    rdata = pytest.importorskip("rdata")
    import numpy as np

    source = fixture_root / "usr/lib/R/site-library/tidytext/data"
    index = rdata.read_rds(source / "Rdata.rdx")
    offset, length = (int(v) for v in index["variables"]["stop_words"])
    block = (source / "Rdata.rdb").read_bytes()[offset : offset + length]
    raw = zlib.decompress(block[4:])
    compress = {b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress, b"0": bytes}[codec]
    new_block = len(raw).to_bytes(4, "big") + codec + compress(raw)
    (tmp_path / "Rdata.rdb").write_bytes(new_block)
    new_index = {
        "variables": {"stop_words": np.array([0, len(new_block)], dtype=np.int32)},
        "references": {},
        "compressed": np.array([2], dtype=np.int32),
    }
    rdata.write_rds(tmp_path / "Rdata.rdx", new_index)
    assert list(read_lazyload_object(tmp_path, "stop_words")) == ["a", "the"]
    with pytest.raises(TaskDataError, match="no object 'nope'"):
        read_lazyload_object(tmp_path, "nope")


def test_package_version_and_cached_debs(tmp_path):
    doc = tmp_path / "usr/share/doc/fortunes"
    doc.mkdir(parents=True)
    with gzip.open(doc / "changelog.Debian.gz", "wt") as f:
        f.write("fortune-mod (1:1.99.1-7.3) unstable; urgency=medium\n\n  * x\n")
    assert package_version(tmp_path, "fortunes") == "1:1.99.1-7.3"
    assert package_version(tmp_path, "wordnet-base") == "unknown"
    debs = tmp_path / "cache/debs"
    debs.mkdir(parents=True)
    (debs / "fortunes_1%3a1.99.1-7.3_all.deb").write_bytes(b"")
    (debs / "fortunes-min_1%3a1.99.1-7.3_all.deb").write_bytes(b"")
    assert set(cached_debs(tmp_path / "cache", ["fortunes", "fortunes-min", "bible-kjv"])) == {
        "fortunes",
        "fortunes-min",
    }
    (debs / "fortunes_1%3a1.99.1-7.4_all.deb").write_bytes(b"")
    with pytest.raises(DebianPackageError, match="several versions of fortunes"):
        cached_debs(tmp_path / "cache", ["fortunes"])


# ---------------------------------------------------------------------------------------------------------
# Rebuild from the real packages (only where they are cached: run build_text8 / `transfuse data build` once)


@pytest.mark.slow  # about 12 s: rdata parses the R data in pure Python
def test_rebuild_from_cached_packages_is_byte_identical(manifest, tmp_path):
    pytest.importorskip("rdata")
    cache = Path(os.environ.get("TRANSFUSE_TEXT8_CACHE") or default_cache_dir())
    debs = cached_debs(cache, TEXT8_PACKAGES)
    missing = [p for p in TEXT8_PACKAGES if p not in debs]
    if missing:
        pytest.skip(f"TEXT-8 packages not cached in {cache} (missing {missing}); build_text8() fetches them")
    versions = {name: urllib.parse.unquote(path.name).split("_")[1] for name, path in debs.items()}
    if versions != manifest["packages"]:
        pytest.skip(
            f"cached package versions {versions} differ from the prepared copy's {manifest['packages']}"
        )
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available")
    build_text8(tmp_path, cache_dir=cache)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in TEXT8_PREPARED_DIR.iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (TEXT8_PREPARED_DIR / name).read_bytes(), name
