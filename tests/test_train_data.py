"""Data loading for training: the GLUE folders, the hub fallback, users' own files, batching, heads."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from peftlab.train import data
from peftlab.train.data import (
    TASKS,
    Collator,
    DataError,
    Examples,
    collate,
    encode,
    find_data_dir,
    get_task,
    head_module_names,
    load_file,
    load_task,
    make_loader,
)

DATA_DIR = find_data_dir()
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="benchmark data (shared/data) not found")

# Row counts and label counts as stated in each folder's README.txt.
README_COUNTS = {
    ("glue_sst2", "train"): (67349, {"positive": 37569, "negative": 29780}),
    ("glue_sst2", "eval"): (872, {"positive": 444, "negative": 428}),
    ("glue_mrpc", "train"): (3668, {"equivalent": 2474, "not_equivalent": 1194}),
    ("glue_mrpc", "eval"): (408, {"equivalent": 279, "not_equivalent": 129}),
    ("glue_rte", "train"): (2490, {"entailment": 1249, "not_entailment": 1241}),
    ("glue_rte", "eval"): (277, {"entailment": 146, "not_entailment": 131}),
    ("glue_qnli", "train"): (9999, {"entailment": 5027, "not_entailment": 4972}),
    ("glue_qnli", "eval"): (5463, {"entailment": 2702, "not_entailment": 2761}),
    ("glue_mnli_subset", "train"): (8999, {"entailment": 3061, "neutral": 2980, "contradiction": 2958}),
    ("glue_mnli_subset", "eval"): (1000, {"entailment": 347, "neutral": 333, "contradiction": 320}),
    ("glue_qqp_subset", "train"): (8999, {"not_duplicate": 5747, "duplicate": 3252}),
    ("glue_qqp_subset", "eval"): (1000, {"not_duplicate": 623, "duplicate": 377}),
}


def bert_tokenizer(tmp: Path, texts: list[tuple[str, ...]], **kwargs: object):
    """A real BERT tokenizer whose WordPiece vocabulary holds every whitespace word of ``texts``."""
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for s in t for w in s.lower().split()})
    folder = tmp / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), **kwargs)


# -- the GLUE folders ---------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize(("task", "split"), sorted(README_COUNTS))
def test_glue_rows_and_labels_match_readme(task: str, split: str) -> None:
    rows, counts = README_COUNTS[(task, split)]
    ex = load_task(task, split)
    assert len(ex) == rows
    assert ex.kind == "classification" and ex.task == task
    assert ex.label_counts() == counts
    assert all(len(t) == len(TASKS[task].text_cols) for t in ex.texts)
    assert all(isinstance(s, str) and s for t in ex.texts[:200] for s in t)
    assert ex.source.endswith(TASKS[task].file_for(split))


@needs_data
@pytest.mark.parametrize(("split", "rows", "mean"), [("train", 5749, 2.70), ("eval", 1500, 2.36)])
def test_stsb_is_regression(split: str, rows: int, mean: float) -> None:
    ex = load_task("glue_stsb", split)
    assert (len(ex), ex.kind, ex.num_labels, ex.label_names) == (rows, "regression", 1, [])
    assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in ex.labels)
    assert sum(ex.labels) / len(ex) == pytest.approx(mean, abs=0.005)
    assert ex.metrics == ["pearson", "spearman"]


@needs_data
def test_texts_are_read_exactly() -> None:
    sst = load_task("glue_sst2", "eval")
    # The file has a trailing space before the tab; normalisation strips it.
    assert sst.texts[0] == ("it 's a charming and often affecting journey .",)
    assert sst.labels[:2] == [1, 0]
    mrpc = load_task("glue_mrpc", "eval")  # BOM-prefixed header, quotes kept verbatim (QUOTE_NONE)
    assert mrpc.texts[0][1] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert mrpc.labels[0] == 1 and mrpc.metrics == ["accuracy", "f1"]
    mnli = load_task("glue_mnli_subset", "eval")
    assert mnli.texts[0] == ("Salt kept the town fed.", "Salt kept the town thriving.")
    assert mnli.label_names == ["entailment", "neutral", "contradiction"] and mnli.labels[0] == 0


@needs_data
def test_limit_is_a_deterministic_random_subset() -> None:
    full = load_task("glue_rte", "train")
    a = load_task("glue_rte", "train", limit=100, seed=3)
    b = load_task("glue_rte", "train", limit=100, seed=3)
    c = load_task("glue_rte", "train", limit=100, seed=4)
    assert len(a) == 100 and a == b and a != c
    assert a.texts != full.texts[:100]  # random, not the head of the file
    positions = [full.texts.index(t) for t in a.texts]
    assert positions == sorted(positions)  # kept in file order
    assert all(full.labels[p] == y for p, y in zip(positions, a.labels))
    assert load_task("glue_rte", "eval", limit=10_000) == load_task("glue_rte", "eval")


def test_task_names_and_aliases() -> None:
    assert get_task("sst2").name == "glue_sst2"
    assert get_task("SST-2").name == "glue_sst2"
    assert get_task("mnli").name == "glue_mnli_subset"
    with pytest.raises(DataError, match="known tasks: .*glue_rte"):
        load_task("glue_nope")
    with pytest.raises(DataError, match="split"):
        load_task("glue_rte", "test")
    for spec in TASKS.values():
        assert spec.hub_id == "nyu-mll/glue" and spec.num_labels == max(1, len(spec.label_names))


# -- finding the data ---------------------------------------------------------------------------

def test_find_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    deep = tmp_path / "repo" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    monkeypatch.chdir(deep)
    assert find_data_dir() == (tmp_path / "shared" / "data").resolve()
    other = tmp_path / "mine"
    other.mkdir()
    monkeypatch.setenv("PEFTLAB_DATA", str(other))
    assert find_data_dir() == other
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path / "missing"))
    assert find_data_dir() is None  # an explicit but wrong choice is not silently replaced


def test_find_data_dir_from_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    # The rule: the first shared/data above the current directory (normally none above a temp dir,
    # but a machine may have one), else the first one above the package.
    above = [*Path(tmp_path).resolve().parents, *Path(data.__file__).resolve().parents]
    expected = next((p / "shared" / "data" for p in above if (p / "shared" / "data").is_dir()), None)
    assert expected is not None and find_data_dir() == expected


# -- the hub fallback ---------------------------------------------------------------------------

# The hub's own layout (columns and ClassLabel order of nyu-mll/glue), written out independently.
HUB_LAYOUT = {
    "glue_sst2": (("sentence",), ["negative", "positive"]),
    "glue_mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"]),
    "glue_rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"]),
    "glue_qnli": (("question", "sentence"), ["entailment", "not_entailment"]),
    "glue_mnli_subset": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"]),
    "glue_qqp_subset": (("question1", "question2"), ["not_duplicate", "duplicate"]),
    "glue_stsb": (("sentence1", "sentence2"), None),
}


def _tiny_copy(src: Path, dst: Path, lines: int = 30) -> None:
    """The header and first rows of a real file, bytes unchanged (BOM and trailing spaces kept)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as f:
        dst.write_bytes(b"".join(f.readline() for _ in range(lines + 1)))


def _as_hub_rows(task: str, path: Path) -> list[dict[str, object]]:
    """What ``datasets`` would return for these rows: hub column names, integer ClassLabels."""
    spec = TASKS[task]
    hub_cols, names = HUB_LAYOUT[task]
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out = []
    for i, row in enumerate(rows):
        raw = row[spec.label_col]
        label: object = float(raw) if names is None else (int(raw) if raw.isdigit() else names.index(raw))
        item = {h: row[c] for h, c in zip(hub_cols, spec.text_cols)}
        out.append({**item, "label": label, "idx": i})
    return out


@needs_data
@pytest.mark.parametrize("task", sorted(HUB_LAYOUT))
def test_hub_fallback_normalises_like_local(task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TASKS[task]
    local = tmp_path / "local"
    _tiny_copy(DATA_DIR / spec.folder / spec.train_file, local / spec.folder / spec.train_file)
    monkeypatch.setenv("PEFTLAB_DATA", str(local))
    from_files = load_task(task, "train")
    assert len(from_files) == 30 and from_files.source.startswith(str(local))

    calls: list[tuple[str, str, str]] = []
    hub_rows = _as_hub_rows(task, local / spec.folder / spec.train_file)

    def load_dataset(path: str, name: str, split: str) -> list[dict[str, object]]:
        calls.append((path, name, split))
        return hub_rows

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PEFTLAB_DATA", str(empty))
    from_hub = load_task(task, "train")
    assert calls == [("nyu-mll/glue", spec.hub_config, "train")]
    assert from_hub.source.startswith("nyu-mll/glue/")
    assert from_hub == from_files  # texts, labels, label names, kind, metrics
    assert load_task(task, "train", limit=7, seed=1) == from_files.sample(7, seed=1)


def test_hub_unreachable_or_missing_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: not installed
    with pytest.raises(DataError) as info:
        load_task("glue_rte", "eval")
    message = str(info.value)
    assert "PEFTLAB_DATA" in message and str(tmp_path) in message
    assert "pip install datasets" in message and "glue_rte/dev.tsv" in message

    def offline(*_: object, **__: object) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    fake = types.ModuleType("datasets")
    fake.load_dataset = offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match="ConnectionError: Couldn't reach"):
        load_task("glue_rte", "eval")


def test_hub_test_split_without_labels_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: [{"sentence": "a film", "label": -1}]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match="outside 0..1"):
        load_task("glue_sst2", "eval")
    fake.load_dataset = lambda *a, **k: [{"text": "a film", "label": 1}]  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="row 0 has no column 'sentence'; columns are: text, label"):
        load_task("glue_sst2", "eval")


# -- users' own files ---------------------------------------------------------------------------

def test_csv_with_string_labels_and_quoted_commas(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('\ufefftext,sentiment\n"good, really good",positive\nbad,negative\n"fine",positive\n')
    ex = load_file(path, ["text"], "sentiment")
    assert ex.texts == [("good, really good",), ("bad",), ("fine",)]
    assert ex.label_names == ["negative", "positive"] and ex.labels == [1, 0, 1]
    assert (ex.kind, ex.metrics, ex.num_labels) == ("classification", ["accuracy", "f1"], 2)


def test_tsv_int_labels_keep_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "stars.tsv"
    path.write_text('a\tb\tstars\n"x\t"y\t10\nq\tr\t2\ns\tt\t1\n')
    ex = load_file(path, ["a", "b"], "stars")
    assert ex.label_names == ["1", "2", "10"]  # not "1", "10", "2"
    assert ex.labels == [2, 1, 0]
    assert ex.texts[0] == ('"x', '"y')  # TSV: quotes are text
    assert ex.metrics == ["accuracy"] and ex.is_pair


def test_jsonl_boolean_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"q": "is it?", "ok": True}, {"q": "no", "ok": False}, {"q": 3, "ok": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ex = load_file(path, ["q"], "ok")
    assert ex.label_names == ["False", "True"] and ex.labels == [1, 0, 1]
    assert ex.texts[2] == ("3",)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("q,ok\na,TRUE\nb,false\n")
    assert load_file(csv_path, ["q"], "ok").labels == [1, 0]
    only_true = tmp_path / "t.jsonl"
    only_true.write_text('{"q": "a", "ok": true}\n')
    assert load_file(only_true, ["q"], "ok", label_names=["False", "True"]).labels == [1]


def test_float_labels_regression_rules(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("t,y\na,0.5\nb,3\nc,4.25\n")
    ex = load_file(path, ["t"], "y")
    assert ex.kind == "regression" and ex.labels == [0.5, 3.0, 4.25]
    assert ex.metrics == ["pearson", "spearman"] and ex.num_labels == 1
    integral = tmp_path / "i.jsonl"
    integral.write_text('{"t": "a", "y": 1.0}\n{"t": "b", "y": 0.0}\n')
    assert load_file(integral, ["t"], "y").kind == "classification"
    forced = load_file(integral, ["t"], "y", kind="regression")
    assert forced.kind == "regression" and forced.labels == [1.0, 0.0]
    words = tmp_path / "w.csv"
    words.write_text("t,y\na,high\n")
    with pytest.raises(DataError, match=r"w.csv:2: regression label 'high' is not a number"):
        load_file(words, ["t"], "y", kind="regression")


def test_eval_file_uses_train_vocabulary(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("t,y\na,neg\nb,pos\nc,neu\n")
    evals = tmp_path / "eval.csv"
    evals.write_text("t,y\nd,pos\n")
    tr = load_file(train, ["t"], "y")
    ev = load_file(evals, ["t"], "y", label_names=tr.label_names, kind=tr.kind)
    assert tr.label_names == ["neg", "neu", "pos"] and ev.labels == [2]
    assert ev.label_names == tr.label_names
    evals.write_text("t,y\nd,great\n")
    with pytest.raises(DataError, match="eval.csv:2: label 'great' is not one of neg, neu, pos"):
        load_file(evals, ["t"], "y", label_names=tr.label_names)


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "x", "label": "b"}, {"instruction": "y", "label": "a"}]))
    assert load_file(path, ["instruction"], "label").labels == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "cols", "pattern"),
    [
        ("m.csv", "text,label\na,1\n", ["sentence"], r"no column 'sentence'; columns are: text, label"),
        ("e.csv", "", ["t"], r"e.csv is empty"),
        ("h.tsv", "t\ty\n", ["t"], r"h.tsv has no data rows"),
        ("b.jsonl", '{"t": "a", "y": 1}\n{"t": "b", "y": 0}\n{"t": "c", y: 1}\n', ["t"], r"b.jsonl:3: not valid JSON"),
        ("n.jsonl", '{"t": "a", "y": 1}\n[1, 2]\n', ["t"], r"n.jsonl:2: expected a JSON object"),
        ("f.tsv", "t\ty\na\t1\nb\t0\textra\n", ["t"], r"f.tsv:3: expected 2 fields like the header, found 3"),
        ("l.csv", "t,y\na,1\nb,\n", ["t"], r"l.csv:3: label is empty"),
        ("k.jsonl", '{"t": "a", "y": 1}\n{"t": "b"}\n', ["t"], r"k.jsonl:2: row has no 'y' field"),
        ("one.csv", "t,y\na,1\nb,1\n", ["t"], r"single class"),
        ("x.txt", "t,y\na,1\n", ["t"], r"unsupported file type '.txt'"),
        ("three.csv", "a,b,c,y\n1,2,3,0\n", ["a", "b", "c"], r"one or two text columns"),
    ],
)
def test_file_errors_are_one_clear_line(tmp_path: Path, name: str, content: str, cols: list[str], pattern: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    label = "label" if name == "m.csv" else "y"
    with pytest.raises(DataError, match=pattern) as info:
        load_file(path, cols, label)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_file(tmp_path / "nope.csv", ["t"], "y")


# -- encoding and batching ------------------------------------------------------------------------

def _pairs() -> Examples:
    texts = [("the cat sat", "on the mat"), ("a dog", "barked loudly at the moon tonight"), ("hi", "there")]
    return Examples(texts, [0, 1, 0], ["no", "yes"], "classification", ["accuracy"])


def test_encode_pairs_and_dynamic_padding(tmp_path: Path) -> None:
    ex = _pairs()
    tok = bert_tokenizer(tmp_path, ex.texts)
    enc = encode(ex, tok, max_length=64)
    lengths = [len(f["input_ids"]) for f in enc.features]
    assert lengths == [3 + 3 + 3, 2 + 6 + 3, 1 + 1 + 3]  # words + [CLS] [SEP] [SEP]
    assert tok.unk_token_id not in [i for f in enc.features for i in f["input_ids"]]
    assert tok.decode(enc.features[0]["input_ids"]) == "[CLS] the cat sat [SEP] on the mat [SEP]"
    assert enc.features[0]["token_type_ids"] == [0] * 5 + [1] * 4
    batch = collate([enc[0], enc[2]], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 9)  # longest in this batch, not max_length
    assert batch["attention_mask"].sum(dim=1).tolist() == [9, 5]
    assert batch["input_ids"][1, 5:].tolist() == [tok.pad_token_id] * 4
    assert batch["token_type_ids"][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 0]
    loader = make_loader(ex, tok, batch_size=3)
    full = next(iter(loader))
    assert full["input_ids"].shape == (3, max(lengths))
    left = Collator(pad_token_id=7, padding_side="left")([enc[2], enc[1]])
    assert left["input_ids"][0, :6].tolist() == [7] * 6 and left["attention_mask"][0, :6].sum() == 0


def test_truncation_regression_labels_and_no_token_types(tmp_path: Path) -> None:
    ex = Examples([("one two three four five six",), ("one",)], [0.5, 4.0], [], "regression",
                  ["pearson"])
    tok = bert_tokenizer(tmp_path, ex.texts, model_input_names=["input_ids", "attention_mask"])
    enc = encode(ex, tok, max_length=4)
    assert [len(f["input_ids"]) for f in enc.features] == [4, 3]
    batch = collate([enc[0], enc[1]], pad_token_id=0, pad_to_multiple_of=8)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 4.0]
    with pytest.raises(ValueError, match="max_length"):
        encode(ex, tok, max_length=1)


# -- task heads -----------------------------------------------------------------------------------

def test_head_module_names_of_real_model_classes() -> None:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16))
    assert head_module_names(bert) == ["classifier"]  # not the (pretrained) pooler, not dropout
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=2, pad_token_id=0))
    assert head_module_names(llama) == ["score"]
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2,
                                                                  hidden_dim=16))
    assert head_module_names(distil) == ["pre_classifier", "classifier"]

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    assert head_module_names(Plain()) == ["classifier"]
