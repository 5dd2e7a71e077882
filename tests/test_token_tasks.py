"""Token tasks (NER, POS): CoNLL / JSONL readers, first-sub-token label alignment, seqeval entity scores."""

from __future__ import annotations

import json
import random
import warnings
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from sftkit.errors import BadInputError
from sftkit.training.evaluation import evaluate_tagger, tag_counts_of
from sftkit.training.features import IGNORE, fixed_batches, make_collator, tokenize_tagged
from sftkit.training.recipes import make_config
from sftkit.training.run_data import load_run_data
from sftkit.training.token_data import TaggedSentence, entity_types, label_order, load_tagged
from sftkit.training.token_metrics import best_metric, count_classes, tag_counts, tag_scores, word_tags

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


# ---------------------------------------------------------------------- a tokenizer with known splits
VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
VOCAB += ["ujung", "bat", "##ee", "is", "big", "##ger", ".", "aceh", "don", "'", "t", "go"]


@pytest.fixture(scope="module")
def tokenizer():
    """WordPiece over a hand-written vocabulary: "Batee" → bat ##ee, "bigger" → big ##ger, "don't" → don ' t."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordPiece({token: i for i, token in enumerate(VOCAB)}, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


UJUNG = TaggedSentence(["Ujung", "Batee", "is", "bigger", ".", "Aceh"], ["B-LOC", "I-LOC", "O", "O", "O", "B-LOC"])
GO = TaggedSentence(["go"], ["O"])
LABEL2ID = {label: i for i, label in enumerate(NER_LABELS)}
OUT, B_LOC, I_LOC = LABEL2ID["O"], LABEL2ID["B-LOC"], LABEL2ID["I-LOC"]


def _single_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message
    return message


# ---------------------------------------------------------------------- readers
def test_conll_tabs_spaces_four_columns_and_docstart(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(
        "-DOCSTART- -X- O O\n\n"
        "Ujung\tB-LOC\nBatee\tI-LOC\nis\tO\n\n\n"  # tabs; several blank lines are one boundary
        "Budi NNP B-NP B-PER\nmakan VB B-VP O\n"  # CoNLL-2003 columns: the tag is the last one
        "   \n"
        "New York\tB-LOC\r\n"  # a tab line keeps the space inside the word; CRLF
        "-DOCSTART-\tO\n"
        "PT  B-ORG\nPos I-ORG",  # runs of spaces; no final newline
        encoding="utf-8",
    )
    data = load_tagged(path)
    assert [(s.words, s.tags) for s in data.sentences] == [
        (["Ujung", "Batee", "is"], ["B-LOC", "I-LOC", "O"]),
        (["Budi", "makan"], ["B-PER", "O"]),
        (["New York"], ["B-LOC"]),
        (["PT", "Pos"], ["B-ORG", "I-ORG"]),
    ]
    # O first, then each type (sorted) with its B- and I- tag, even I-PER that the data never uses.
    assert data.labels == NER_LABELS
    assert data.entity_types == ["LOC", "ORG", "PER"]
    assert data.describe() == {"source": str(path), "sha256": data.sha256, "sentences": 4, "words": 8}
    assert data.sha256.startswith("sha256:") and len(data.sha256) == 7 + 64


def test_pos_labels_are_sorted_and_iobes_keeps_all_four_prefixes(tmp_path):
    path = tmp_path / "pos.txt"
    path.write_text("Budi\tPROPN\nmakan\tVERB\nnasi\tNOUN\n.\tPUNCT\n")
    data = load_tagged(path)
    assert data.labels == ["NOUN", "PROPN", "PUNCT", "VERB"]
    assert data.entity_types is None
    assert label_order(["S-PER", "O", "B-LOC", "E-LOC"]) == [
        "O",
        *("B-LOC", "I-LOC", "E-LOC", "S-LOC"),
        *("B-PER", "I-PER", "E-PER", "S-PER"),
    ]
    assert entity_types(["O"]) is None and entity_types(["-LRB-", "O"]) is None


def test_jsonl_string_tags_and_integer_tags_with_a_label_list(tmp_path):
    path = tmp_path / "wikiann.jsonl"
    rows = [
        {"tokens": ["Banda", "Aceh"], "tags": ["B-LOC", "I-LOC"]},
        {"tokens": [], "tags": []},  # an empty sentence is skipped
        {"tokens": ["Budi"], "tags": ["B-PER"]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    data = load_tagged(path)
    assert [s.words for s in data.sentences] == [["Banda", "Aceh"], ["Budi"]]
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]

    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"words": ["Banda", "Aceh", "x"], "ner": [1, 2, 0]}) + "\n")
    named = ["O", "B-LOC", "I-LOC"]  # the dataset's order (a ClassLabel's names) is kept as the label order
    data = load_tagged(ids, named, tokens_key="words", tags_key="ner")
    assert data.sentences == [TaggedSentence(["Banda", "Aceh", "x"], ["B-LOC", "I-LOC", "O"])]
    assert data.labels == named


def test_in_memory_sentences():
    data = load_tagged([(["a", "b"], ["X", "Y"]), TaggedSentence(["c"], ["X"])])
    assert data.labels == ["X", "Y"] and data.source == "<memory>" and data.words == 3
    with pytest.raises(BadInputError, match="sentence 1: 2 tokens but 1 tags"):
        load_tagged([(["a", "b"], ["X"])])


@pytest.mark.parametrize(
    ("name", "content", "labels", "expected"),
    [
        ("a.conll", "Ujung\tB-LOC\nBatee\tI-LOC\n\nis\tO\nbigger\n", None, ["line 5", "'bigger'", "no tag"]),
        ("a.conll", "Ujung B-LOC\n\tO\n", None, ["line 2", "empty word"]),
        ("a.conll", "Ujung\tB-LOC\nBatee\t\n", None, ["line 2", "empty tag", "'Batee'"]),
        ("a.conll", "Ujung\tB-LOC\nBatee\tI-MISC\n", NER_LABELS, ["line 2", "unknown tag 'I-MISC'"]),
        ("a.conll", "\n\n-DOCSTART- O\n\n", None, ["no tagged sentence in it"]),
        ("a.jsonl", "", None, ["no tagged sentence in it"]),
        ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n', None,
         ["line 2", "2 tokens but 1 tags"]),
        ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n\n{"tokens": ["a"], "tags": [3]}\n', None,
         ["line 3", "integer tag 3 needs the label list"]),
        ("a.jsonl", '{"tokens": ["a"], "tags": [3]}\n', ["O", "B-X"], ["line 1", "tag 3 is out of range for 2 labels"]),
        ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a"]}\n', None, ["line 2", "no key 'tags'"]),
        ("a.jsonl", '{"tokens": ["a", " "], "tags": ["O", "O"]}\n', None, ["line 1", "token 2"]),
        ("a.jsonl", '{"tokens": "a b", "tags": ["O", "O"]}\n', None, ["line 1", "'tokens' must be a list"]),
        ("a.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [\n', None, ["line 2", "not valid JSON"]),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, content, labels, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError) as error:
        load_tagged(path, labels)
    _single_line(error, str(path), *expected)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.conll"
    path.write_bytes(b"Ujung\tB-LOC\nBat\xe9e\tI-LOC\n")
    with pytest.raises(BadInputError) as error:
        load_tagged(path)
    _single_line(error, "line 2", "UTF-8")


# ---------------------------------------------------------------------- features
def test_first_subtoken_labels_exactly(tokenizer):
    (item,) = tokenize_tagged(tokenizer, [UJUNG], LABEL2ID, max_length=64, scored=True)
    tokens = tokenizer.convert_ids_to_tokens(item["input_ids"])
    assert tokens == ["<s>", "ujung", "bat", "##ee", "is", "big", "##ger", ".", "aceh", "</s>"]
    assert item["labels"] == [IGNORE, B_LOC, I_LOC, IGNORE, OUT, OUT, IGNORE, OUT, B_LOC, IGNORE]
    assert item["attention_mask"] == [1] * 10
    assert item["word_index"] == [0, 1, 2, 3, 4, 5]
    assert item["gold_tags"] == [B_LOC, I_LOC, OUT, OUT, OUT, B_LOC]


def test_a_word_split_by_the_pre_tokenizer_is_still_one_word(tokenizer):
    sentence = TaggedSentence(["don't", "go"], ["B-PER", "O"])
    (item,) = tokenize_tagged(tokenizer, [sentence], LABEL2ID, max_length=64)
    assert tokenizer.convert_ids_to_tokens(item["input_ids"]) == ["<s>", "don", "'", "t", "go", "</s>"]
    assert item["labels"] == [IGNORE, LABEL2ID["B-PER"], IGNORE, IGNORE, OUT, IGNORE]


def test_truncation_keeps_the_first_subtoken_of_a_cut_word(tokenizer):
    # max_length 4: <s> ujung bat </s> — "Batee" loses ##ee but keeps its label; the rest gets none.
    (item,) = tokenize_tagged(tokenizer, [UJUNG], LABEL2ID, max_length=4)
    assert tokenizer.convert_ids_to_tokens(item["input_ids"]) == ["<s>", "ujung", "bat", "</s>"]
    assert item["labels"] == [IGNORE, B_LOC, I_LOC, IGNORE]
    (item,) = tokenize_tagged(tokenizer, [UJUNG], LABEL2ID, max_length=6, scored=True)
    assert item["labels"] == [IGNORE, B_LOC, I_LOC, IGNORE, OUT, IGNORE]
    assert item["word_index"] == [0, 1, 2] and len(item["gold_tags"]) == 6  # scored: every word's gold tag


def test_collator_pads_labels_with_ignore(tokenizer):
    items = tokenize_tagged(tokenizer, [UJUNG, GO], LABEL2ID, 64)
    batch = make_collator("tagging", tokenizer, 0.0)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 10)
    assert batch["labels"][1].tolist() == [IGNORE, OUT, IGNORE] + [IGNORE] * 7
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 7
    scored = make_collator("tagging", tokenizer, 0.0)(
        tokenize_tagged(tokenizer, [UJUNG, GO], LABEL2ID, 64, scored=True)
    )
    assert scored["word_index"].tolist() == [[0, 1, 2, 3, 4, 5], [0] + [IGNORE] * 5]  # per word, not per token
    assert scored["gold_tags"][1].tolist() == [OUT] + [IGNORE] * 5


def test_unknown_tag_and_slow_tokenizer_are_errors(tokenizer):
    with pytest.raises(BadInputError, match="sentence 1: tag 'B-MISC'"):
        tokenize_tagged(tokenizer, [TaggedSentence(["go"], ["B-MISC"])], LABEL2ID, 64)
    with pytest.raises(BadInputError, match="fast tokenizer"):
        tokenize_tagged(SimpleNamespace(is_fast=False), [UJUNG], LABEL2ID, 64)


def test_alignment_with_a_trained_tokenizer(tiny_base):
    """The toy base's WordPiece tokenizer (trained on the fly): each label sits on its word's first piece."""
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(tiny_base)
    words = ["Lon", "galak", "that", "keu", "droneuh", "zzqx", "!?"]
    sentence = TaggedSentence(words, ["O"] * len(words))
    (item,) = tokenize_tagged(trained, [sentence], {"O": 0}, 128)
    pieces = [trained.tokenize(word) for word in words]
    assert any(len(p) > 1 for p in pieces)  # the test covers multi-piece words
    expected = [IGNORE] + [label for p in pieces for label in [0] + [IGNORE] * (len(p) - 1)] + [IGNORE]
    assert item["labels"] == expected
    firsts = [
        trained.convert_ids_to_tokens(i)
        for i, label in zip(item["input_ids"], item["labels"], strict=True)
        if label == 0
    ]
    assert firsts == [p[0] for p in pieces]


# ---------------------------------------------------------------------- metrics
GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
PREDICTED = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "B-LOC", "O"]]


def test_entity_scores_on_a_hand_checked_example():
    # gold: PER[0:1] LOC[3] | ORG[0] LOC[2:3] = 4 entities; predicted: PER[0:1] | ORG[0] LOC[2] = 3, 2 exact.
    counts = tag_counts(GOLD, PREDICTED, NER_LABELS)
    assert count_classes(NER_LABELS) == ["LOC", "ORG", "PER"]
    assert counts.tolist() == [[0, 1, 2], [1, 1, 1], [1, 1, 1], [6, 8, 8]]
    result = tag_scores(counts, NER_LABELS)
    assert result["entity_precision"] == pytest.approx(2 / 3)
    assert result["entity_recall"] == pytest.approx(1 / 2)
    assert Fraction(result["entity_f1"]).limit_denominator(100) == Fraction(4, 7)
    assert result["macro_f1"] == pytest.approx(2 / 3)  # (0 + 1 + 1) / 3
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["per_class"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert result["entities"] == 4 and result["n"] == 8
    assert best_metric(NER_LABELS) == "entity_f1"

    from seqeval.metrics import f1_score

    assert result["entity_f1"] == pytest.approx(f1_score(GOLD, PREDICTED))


def test_entity_scores_agree_with_seqeval_on_random_sequences():
    """Counts (which sum across batches and processes) give seqeval's micro and per-type scores,
    including ill-formed sequences (I- after O, B-X I-Y)."""
    from seqeval.metrics import classification_report

    rng = random.Random(0)
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    gold = [[rng.choice(labels) for _ in range(rng.randint(1, 9))] for _ in range(60)]
    predicted = [[tag if rng.random() < 0.7 else rng.choice(labels) for tag in sentence] for sentence in gold]
    counts = sum(tag_counts(gold[i : i + 7], predicted[i : i + 7], labels) for i in range(0, 60, 7))
    assert torch.equal(counts, tag_counts(gold, predicted, labels))
    ours = tag_scores(counts, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = classification_report(gold, predicted, output_dict=True, zero_division=0)
    assert ours["entity_f1"] == pytest.approx(theirs["micro avg"]["f1-score"])
    assert ours["entity_precision"] == pytest.approx(theirs["micro avg"]["precision"])
    assert ours["entity_recall"] == pytest.approx(theirs["micro avg"]["recall"])
    assert ours["macro_f1"] == pytest.approx(theirs["macro avg"]["f1-score"])
    for kind in ("LOC", "PER"):
        assert ours["per_class"][kind]["f1"] == pytest.approx(theirs[kind]["f1-score"])
        assert ours["per_class"][kind]["support"] == theirs[kind]["support"]


def test_missing_predictions_count_as_outside_for_ner_and_wrong_for_pos():
    result = tag_scores(tag_counts([["B-PER", "O", "B-LOC"]], [["B-PER", "O"]], NER_LABELS), NER_LABELS)
    assert (result["entity_precision"], result["entity_recall"]) == (1.0, 0.5)
    assert result["accuracy"] == pytest.approx(2 / 3)

    tags = ["DET", "NOUN", "VERB"]
    gold = [["NOUN", "VERB", "NOUN"], ["DET", "NOUN"]]
    predicted = [["NOUN", "NOUN", "NOUN"], ["DET", None]]
    result = tag_scores(tag_counts(gold, predicted, tags), tags)
    assert best_metric(tags) == "accuracy" and "entity_f1" not in result
    assert result["accuracy"] == pytest.approx(3 / 5) and result["n"] == 5
    assert result["per_class"]["NOUN"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert result["per_class"]["VERB"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(BadInputError, match="sentence 1: unknown tag 'ADJ'"):
        tag_counts([["ADJ"]], [["DET"]], tags)


def test_word_tags_reads_first_subtoken_positions():
    labels = ["O", "B-LOC", "I-LOC"]
    gold = torch.tensor([[IGNORE, 1, 2, IGNORE, 0, IGNORE], [IGNORE, 0, IGNORE, IGNORE, IGNORE, IGNORE]])
    predicted = torch.tensor([[2, 1, 1, 0, 0, 2], [1, 1, 2, 2, 0, 0]])
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    expected = ([["B-LOC", "I-LOC", "O"], ["O"]], [["B-LOC", "B-LOC", "O"], ["B-LOC"]])
    assert word_tags(logits, gold, labels) == expected
    assert word_tags(predicted, gold, labels) == expected


# ---------------------------------------------------------------------- model scoring
class _Oracle(torch.nn.Module):
    """A "model" whose logits depend only on the token: ujung → B-LOC, bat → I-LOC, anything else → O."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(len(VOCAB), 3)
        table[:, 0] = 1
        table[VOCAB.index("ujung")] = torch.tensor([0.0, 1.0, 0.0])
        table[VOCAB.index("bat")] = torch.tensor([0.0, 0.0, 1.0])
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(id2label={0: "O", 1: "B-LOC", 2: "I-LOC"})

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_evaluate_tagger_scores_every_word_including_truncated_ones(tokenizer, tmp_path):
    path = tmp_path / "test.conll"
    path.write_text("Ujung B-LOC\nBatee I-LOC\nis O\nbigger O\n. O\nAceh B-LOC\n\ngo O\n")
    full = evaluate_tagger(_Oracle(), path, tokenizer=tokenizer, device="cpu")
    # The oracle misses "Aceh": gold LOC[0:1] LOC[5]; predicted LOC[0:1].
    assert (full["entity_precision"], full["entity_recall"]) == (1.0, 0.5)
    assert full["entity_f1"] == pytest.approx(2 / 3)
    assert full["accuracy"] == pytest.approx(6 / 7) and full["n"] == 7 and full["unpredicted_words"] == 0
    # max_length 8 cuts ". Aceh": scored as O (right for ".", a miss for "Aceh" either way).
    cut = evaluate_tagger(_Oracle(), path, tokenizer=tokenizer, device="cpu", max_length=8, batch_size=1)
    assert cut["unpredicted_words"] == 2
    assert {key: cut[key] for key in ("entity_f1", "accuracy")} == {key: full[key] for key in ("entity_f1", "accuracy")}
    with pytest.raises(BadInputError, match="line 2: unknown tag 'B-PER'"):
        load_tagged_path = tmp_path / "bad.conll"
        load_tagged_path.write_text("go O\nBudi B-PER\n")
        evaluate_tagger(_Oracle(), load_tagged_path, tokenizer=tokenizer, device="cpu")


def test_tag_counts_of_batches_matches_word_level_counts(tokenizer):
    labels = ["O", "B-LOC", "I-LOC"]
    sentences = [UJUNG, TaggedSentence(["go", "Ujung"], ["O", "B-LOC"])]
    items = tokenize_tagged(tokenizer, sentences, {label: i for i, label in enumerate(labels)}, 64, scored=True)
    batch = make_collator("tagging", tokenizer, 0.0)(items)
    counts = tag_counts_of(_Oracle(), [batch], labels)
    predicted = [["B-LOC", "I-LOC", "O", "O", "O", "O"], ["O", "B-LOC"]]
    assert torch.equal(counts, tag_counts([s.tags for s in sentences], predicted, labels))
    assert tag_scores(counts, labels)["entity_f1"] == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))


def test_validation_during_training_scores_truncated_words_as_sftkit_eval_does(tokenizer, tmp_path):
    """Entities at words 1 and 11, max_length 8, a model perfect on every word it sees: the trainer's
    validation (the run's held-out items, collated as the trainer does) and ``evaluate_tagger`` both find
    one of two entities."""
    labels = ["O", "B-LOC", "I-LOC"]
    words = ["go", "Ujung", *["is"] * 9, "Ujung"]
    sentence = TaggedSentence(words, ["B-LOC" if word == "Ujung" else "O" for word in words])
    path = tmp_path / "held.conll"
    path.write_text("\n".join(f"{w}\t{t}" for w, t in zip(sentence.words, sentence.tags, strict=True)) + "\n")
    config = make_config(task="ner", labels=labels, max_length=8, eval_batch_size=4)
    held = load_run_data(config, tokenizer, [(["go"], ["O"])], str(path)).validation_items
    batches = fixed_batches(held, make_collator(config.collator_kind, tokenizer, 0.0), config.eval_batch_size)
    during_training = tag_scores(tag_counts_of(_Oracle(), batches, labels), labels)
    evaluated = evaluate_tagger(_Oracle(), path, tokenizer=tokenizer, device="cpu", max_length=8)
    assert (during_training["entity_recall"], during_training["entities"]) == (0.5, 2)
    assert (evaluated["entity_recall"], evaluated["entities"], evaluated["unpredicted_words"]) == (0.5, 2, 6)
    assert {key: evaluated[key] for key in during_training} == during_training
