"""A user's own task files (CSV / TSV / JSONL / JSON) and Hugging Face datasets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from transfuse.data import (
    Example,
    Task,
    TaskDataError,
    TaskSuite,
    load_hf_task,
    load_task_file,
    load_task_suite,
)


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def all_texts(task: Task) -> list[str]:
    return [e.text for split in ("train", "validation", "test") for e in task.split(split)]


def test_csv_without_split_column_is_deduplicated_and_stratified(tmp_path):
    rows = [f'"review {i}, good",pos' for i in range(40)] + [f"review {i} bad,neg" for i in range(20)]
    rows += ['"review 0,  good",pos', "review 0 bad,pos"]  # a whitespace duplicate; a text with two labels
    task = load_task_file(write_csv(tmp_path / "reviews.csv", "text,label", rows))
    assert task.name == "reviews"
    assert task.label_names == ["neg", "pos"]
    texts = all_texts(task)
    assert len(texts) == len(set(texts)) == 59  # 60 - the conflicting "review 0 bad"
    assert "review 0 bad" not in texts
    assert task.class_counts("test") == [2, 4] and task.class_counts("validation") == [2, 4]
    assert task.metadata["dedup"]["conflicting_texts"] == 1
    assert task.provenance.startswith("user file reviews.csv (sha256 ")
    again = load_task_file(tmp_path / "reviews.csv")
    assert again == task
    other_seed = load_task_file(tmp_path / "reviews.csv", seed=1)
    assert other_seed.test != task.test


def test_csv_with_split_column_and_custom_columns(tmp_path):
    rows = ["a one,1,train", "b two,2,train", "c three,10,val", "d four,2,test", "e five,1,TEST"]
    path = write_csv(tmp_path / "t.csv", "sentence,y,split", rows)
    task = load_task_file(path, name="mine", text_column="sentence", label_column="y")
    assert task.name == "mine"
    assert task.label_names == ["1", "2", "10"]  # integers sort numerically
    assert task.train == [Example("a one", 0), Example("b two", 1)]
    assert task.validation == [Example("c three", 2)]
    assert [e.text for e in task.test] == ["d four", "e five"]


def test_jsonl_json_tsv_and_gzip(tmp_path):
    records = [{"text": f"t{i}", "label": i % 3, "extra": None} for i in range(30)]
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    as_json = tmp_path / "x.json"
    as_json.write_text(json.dumps(records))
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    tsv = write_csv(tmp_path / "x.tsv", "text\tlabel", [f"t{i}\t{i % 3}" for i in range(30)])
    tasks = [load_task_file(p) for p in (jsonl, as_json, gz, tsv)]
    for task in tasks:
        assert task.label_names == ["0", "1", "2"]
        assert sorted(all_texts(task)) == sorted(f"t{i}" for i in range(30))
        assert task.split("val") == task.validation
    assert tasks[0].train == tasks[1].train == tasks[2].train == tasks[3].train


def test_load_task_suite_accepts_a_task_file(tmp_path):
    path = write_csv(tmp_path / "small.csv", "text,label", [f"x{i},{'ab'[i % 2]}" for i in range(20)])
    suite = load_task_suite(path, max_train=4)
    assert isinstance(suite, TaskSuite) and suite.names == ["small"]
    assert len(suite["small"].train) == 4 and suite["small"].class_counts("train") == [2, 2]


def test_a_folder_of_task_files_is_a_pool(tmp_path):
    pool = tmp_path / "my_pool"
    pool.mkdir()
    write_csv(pool / "b_topic.csv", "text,label", [f"topic {i},{'xy'[i % 2]}" for i in range(20)])
    rows = [json.dumps({"text": f"mood {i}", "label": i % 3}) for i in range(30)]
    (pool / "a_mood.jsonl.gz").write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    (pool / "notes.txt").write_text("not a task")
    suite = load_task_suite(pool)
    assert suite.name == "my_pool" and suite.names == ["a_mood", "b_topic"]  # file-name order
    assert suite["a_mood"].label_names == ["0", "1", "2"] and len(suite["b_topic"].test) == 2
    assert load_task_suite(pool, tasks=["b_topic"]).names == ["b_topic"]
    assert len(load_task_suite(pool, max_train=6)["a_mood"].train) == 6
    listed = load_task_suite(f"{pool / 'b_topic.csv'}, {pool / 'a_mood.jsonl.gz'}")
    assert listed.name == "custom" and listed.names == ["b_topic", "a_mood"]  # the order given


def test_pool_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TaskDataError, match="neither a manifest.json .* nor task files"):
        load_task_suite(empty)
    twice = tmp_path / "twice"
    twice.mkdir()
    write_csv(twice / "t.csv", "text,label", ["a,x", "b,y"])
    (twice / "t.jsonl").write_text('{"text": "c", "label": "x"}\n{"text": "d", "label": "y"}\n')
    with pytest.raises(TaskDataError, match="two tasks are named 't'"):
        load_task_suite(twice)
    with pytest.raises(TaskDataError, match="comma-separated list"):
        load_task_suite(f"{twice / 't.csv'},{tmp_path / 'missing.csv'}")
    with pytest.raises(TaskDataError, match="give a dataset id"):
        load_task_suite("hf:")


def test_hf_ids_in_a_pool_go_to_load_hf_task(monkeypatch, tmp_path):
    import transfuse.data.task as task_module

    calls = []

    def fake(dataset, config=None):
        calls.append((dataset, config))
        return Task(dataset, ["a", "b"], [("x", 0), ("y", 1)], [], [("z", 1)])

    monkeypatch.setattr(task_module, "load_hf_task", fake)
    path = write_csv(tmp_path / "mine.csv", "text,label", [f"m{i},{'ab'[i % 2]}" for i in range(20)])
    suite = load_task_suite(f"hf:glue/sst2,{path}")
    assert calls == [("glue", "sst2")] and suite.names == ["glue", "mine"]
    assert load_task_suite("hf:imdb").names == ["imdb"] and calls[-1] == ("imdb", None)


def test_given_splits_drop_texts_already_seen_in_an_earlier_split(tmp_path):
    rows = [
        "a,x,train",
        "b,y,train",
        "a,x,test",
        "c,y,validation",
        " c ,y,test",
        "d,x,test",
        "b,y,validation",
    ]
    with pytest.warns(UserWarning, match="dropped 3 validation/test row"):
        task = load_task_file(write_csv(tmp_path / "leaky.csv", "text,label,split", rows))
    assert (
        task.texts("train") == ["a", "b"]
        and task.texts("validation") == ["c"]
        and task.texts("test") == ["d"]
    )
    with pytest.raises(TaskDataError, match="every test text"):
        load_task_file(
            write_csv(tmp_path / "all.csv", "text,label,split", ["a,x,train", "b,y,train", "a,x,test"])
        )


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("", {}, "empty"),
        ("text,label\n", {}, "header but no rows"),
        (
            "sentence,label\na,x\nb,y\n",
            {},
            r"column 'text' \(text_column\) is missing; columns found: \['sentence', 'label'\]",
        ),
        ("text,label\na,x\nb,y\n", {"label_column": "y"}, "column 'y'"),
        ("text,label\na,x\nb,x\nc,x\n", {}, "only one class"),
        ("text,label\na,x\nb,\n", {}, "empty label"),
        ("text,label,split\na,x,train\nb,y,holdout\n", {}, "unknown split 'holdout'"),
        ("text,label,split\na,x,train\nb,y,train\n", {}, "no 'test' rows"),
        ("text,label,split\na,x,train\nb,y,\n", {}, "empty in some rows"),
        ("text,label\na,x\nb,y\n", {"label_names": ["x"]}, "not among label_names"),
        ("text,label\na,x,extra\nb,y\n", {}, "more fields"),
    ],
)
def test_task_file_errors_name_the_problem(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TaskDataError, match=message):
        load_task_file(path, **kwargs)


def test_more_file_errors(tmp_path):
    with pytest.raises(TaskDataError, match="no such task file"):
        load_task_file(tmp_path / "missing.csv")
    bad = tmp_path / "x.txt"
    bad.write_text("a,b\n")
    with pytest.raises(TaskDataError, match="unknown task file type"):
        load_task_file(bad)
    broken = tmp_path / "x.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(TaskDataError, match=r"x.jsonl:2: not valid JSON"):
        load_task_file(broken)
    partial = tmp_path / "y.jsonl"
    partial.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(TaskDataError, match="missing from 1 of 2 rows"):
        load_task_file(partial)
    with pytest.raises(TaskDataError):
        load_task_suite(tmp_path / "nowhere")


def test_task_and_suite_validation():
    with pytest.raises(TaskDataError, match="two classes"):
        Task("t", ["only"], [("a", 0)], [], [])
    with pytest.raises(TaskDataError, match="outside"):
        Task("t", ["a", "b"], [("a", 2)], [], [])
    with pytest.raises(TaskDataError, match="train split is empty"):
        Task("t", ["a", "b"], [], [], [("x", 0)])
    task = Task("t", ["a", "b"], [("x", 0), ("y", 1)], [], [("z", 1)])
    assert task.train[0] == Example("x", 0) and task.texts("test") == ["z"] and task.labels("train") == [0, 1]
    with pytest.raises(TaskDataError, match="repeat"):
        TaskSuite("s", (task, task))
    suite = TaskSuite("s", (task,))
    assert suite[0] is suite["t"] and "t" in suite and len(suite) == 1
    with pytest.raises(KeyError, match="no task 'u'"):
        suite["u"]
    with pytest.raises(KeyError):
        task.split("holdout")


def test_hugging_face_dataset_dict():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(40)], "y": [i % 2 for i in range(40)]}, features=features
    )
    test = datasets.Dataset.from_dict({"sentence": ["t0", "t1"], "y": [0, 1]}, features=features)
    task = load_hf_task(
        datasets.DatasetDict({"train": train, "test": test}),
        name="hf",
        text_column="sentence",
        label_column="y",
    )
    assert task.label_names == ["neg", "pos"]
    assert [e.text for e in task.test] == ["t0", "t1"]
    assert len(task.validation) == 4 and len(task.train) == 36  # 10% of train carved out, per class
    assert task.class_counts("validation") == [2, 2]
    assert not {e.text for e in task.validation} & {e.text for e in task.train}
    only_train = load_hf_task(train, name="hf2", text_column="sentence", label_column="y")
    assert (len(only_train.train), len(only_train.validation), len(only_train.test)) == (32, 4, 4)
    with pytest.raises(TaskDataError, match="column 'text' is missing"):
        load_hf_task(datasets.DatasetDict({"train": train}))
