"""Data readers: every supported format, and a clear error naming file and line for every bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import requires_data

from sftkit.errors import BadInputError, NotFoundError
from sftkit.training.data import LabelledExample, load_corpus, load_labelled, parse_hub_spec


def test_plain_text_corpus_one_example_per_line(tmp_path):
    path = tmp_path / "ace.txt"
    path.write_text("first line\n\n  second line  \r\nthird\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.texts == ["first line", "second line", "third"]
    assert corpus.source == str(path)
    assert corpus.sha256.startswith("sha256:") and len(corpus.sha256) == 7 + 64


def test_corpus_from_a_column_of_a_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('id,text,label\n1,"hello, world",positive\n2,bye,negative\n', encoding="utf-8")
    assert load_corpus(path).texts == ["hello, world", "bye"]


def test_nusax_csv_single_texts(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('id,text,label\n1,"good, very good",positive\n2,bad,negative\n3,so so,neutral\n')
    data = load_labelled(path)
    assert not data.pair
    assert data.examples[0] == LabelledExample("good, very good", "positive")
    assert data.labels == ["negative", "neutral", "positive"]


def test_smsa_tsv_without_header(tmp_path):
    path = tmp_path / "smsa.tsv"
    path.write_text('warung ini "enak" sekali\tpositive\npelayanan buruk\tnegative\n', encoding="utf-8")
    data = load_labelled(path)
    assert [(e.text, e.label) for e in data.examples] == [
        ('warung ini "enak" sekali', "positive"),
        ("pelayanan buruk", "negative"),
    ]


def test_americasnli_tsv_is_read_as_pairs(tmp_path):
    path = tmp_path / "aym.tsv"
    path.write_text(
        "id\tlanguage\tpremise\thypothesis\tlabel\n"
        "1\taym\tJupax sanwa.\tJupax janiw.\tcontradiction\n"
        "2\taym\tMamita.\tUtankastwa.\tentailment\n"
    )
    data = load_labelled(path)
    assert data.pair
    assert data.examples[1] == LabelledExample("Mamita.", "entailment", "Utankastwa.")


def test_jsonl_with_column_options(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"sentence": "a b", "gold": 1}, {"sentence": "c d", "gold": 0}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    data = load_labelled(path, text_column="sentence", label_column="gold")
    assert [(e.text, e.label) for e in data.examples] == [("a b", "1"), ("c d", "0")]


def test_in_memory_examples():
    single = load_labelled([("a", "x"), ("b", "y")])
    pairs = load_labelled([("p", "h", "entailment")])
    assert single.examples[0] == LabelledExample("a", "x") and not single.pair
    assert pairs.examples[0] == LabelledExample("p", "entailment", "h") and pairs.pair
    assert load_corpus(["x", " ", "y"]).texts == ["x", "y"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "empty"),
        ("blank.csv", "", "empty"),
        ("nolabel.csv", "id,text\n1,hello\n", r"no column 'label' \(--label-column\); the columns are id, text"),
        ("short.csv", "id,text,label\n1,hello,positive\n2,oops\n", "line 3: 2 fields"),
        ("emptytext.csv", "id,text,label\n1,,positive\n", "line 2: empty text"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\nnot json\n', "line 2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("labels.txt", "a plain line\n", "cannot read labels from a plain-text file"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    reader = load_corpus if name in ("empty.txt",) else load_labelled
    with pytest.raises(BadInputError, match=message) as error:
        reader(path)
    assert str(path) in str(error.value)


def test_unknown_label_names_file_and_line(tmp_path):
    path = tmp_path / "valid.csv"
    path.write_text("id,text,label\n1,fine,positive\n2,hmm,sarcastic\n")
    with pytest.raises(BadInputError, match=r"valid\.csv: line 3: unknown label 'sarcastic'"):
        load_labelled(path, labels=["negative", "neutral", "positive"])


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok line\nsecond line\ncaf\xe9 latin-1\n".encode("latin-1"))
    with pytest.raises(BadInputError, match=r"latin1\.txt: line 3: not valid UTF-8 \(byte 0xe9\)"):
        load_corpus(path)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match="no such file"):
        load_corpus(tmp_path / "nope.txt")


def test_hub_spec_parsing():
    assert parse_hub_spec("hf:wikimedia/wikipedia:20231101.ace") == ("wikimedia/wikipedia", "20231101.ace", "train")
    assert parse_hub_spec("hf:nyu-mll/multi_nli@validation_matched") == (
        "nyu-mll/multi_nli",
        None,
        "validation_matched",
    )
    with pytest.raises(BadInputError):
        parse_hub_spec("hf:")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="the datasets extra is installed")
def test_hub_data_without_the_datasets_extra_says_how_to_get_it():
    with pytest.raises(BadInputError, match=r"pip install 'sftkit\[datasets\]'"):
        load_corpus("hf:wikimedia/wikipedia:20231101.ace")


def test_real_nusax_and_americasnli_files():
    nusax = requires_data("nusax", "sentiment", "acehnese", "test.csv")
    anli = requires_data("americasnli", "test", "aym.tsv")
    sentiment = load_labelled(nusax)
    assert len(sentiment.examples) == 400 and sentiment.labels == ["negative", "neutral", "positive"]
    assert sum(e.label == "negative" for e in sentiment.examples) == 153
    nli = load_labelled(anli)
    assert nli.pair and len(nli.examples) == 750
    assert {label: sum(e.label == label for e in nli.examples) for label in nli.labels} == {
        "contradiction": 250,
        "entailment": 250,
        "neutral": 250,
    }
    assert len(load_corpus(requires_data("nusax", "sentiment", "acehnese", "train.csv")).texts) == 500
