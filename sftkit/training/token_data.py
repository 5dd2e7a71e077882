"""Reading token-level data (NER, POS): sentences of words, one tag per word, with errors that name the line.

Formats (chosen by the file's suffix):

- ``.jsonl`` / ``.json``: one JSON object per line with a list of ``tokens`` and a list of ``tags`` of the
  same length (both keys overridable). Tags are strings, or integers indexing the ``labels`` list given
  to :func:`load_tagged` (how 🤗 datasets such as WikiANN store them);
- anything else (``.conll``, ``.txt``, ``.tsv``, ``.bio``, …): CoNLL style, one word per line and a blank
  line between sentences. A line with a tab is split on tabs, any other on runs of spaces; the first field
  is the word and the **last** field is the tag, so ``word<TAB>tag``, ``word tag`` (MasakhaNER) and the
  four-column CoNLL-2003 ``word POS chunk NER`` all read as (word, tag). Only the tab form can carry a
  word with a space inside. ``-DOCSTART-`` lines are skipped (and end a sentence).

Sentences without words (an empty ``tokens`` list, repeated blank lines) are skipped. Every record keeps
the SHA-256 of its bytes, like :mod:`sftkit.training.data`.

The label list (:attr:`TaggedData.labels`) is the ``labels`` given, else it is derived from the data with a
stable order: for BIO / IOBES entity tags ``O`` first, then for each entity type (sorted) its ``B-``, ``I-``
(and ``E-``, ``S-`` when the data uses IOBES) tags — all of them, even those absent from this file, so a
model trained on single-word entities can still predict their ``I-`` tag; any other tag set (POS) sorted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.errors import BadInputError
from sftkit.training.data import HUB_PREFIX, MEMORY, decode_text, jsonl_rows, memory_sha256, read_bytes

DOCSTART = "-DOCSTART-"
OUTSIDE = "O"
_ENTITY_TAG = re.compile(r"^([BIES])-(.+)$")
_JSON_SUFFIXES = (".jsonl", ".json")
# Suffixes that say "one word and its tag per line" on their own (``.txt`` / ``.tsv`` do not: SMSA is a TSV).
TAGGED_SUFFIXES = (".conll", ".conll03", ".conll2003", ".bio", ".iob", ".iob2", ".bioes", ".iobes")


@dataclass(frozen=True)
class TaggedSentence:
    words: list[str]
    tags: list[str]


@dataclass(frozen=True)
class TaggedData:
    """Tagged sentences (NER or POS) and the label order of a model trained or evaluated on them."""

    sentences: list[TaggedSentence]
    source: str
    sha256: str
    labels: list[str]

    @property
    def entity_types(self) -> list[str] | None:
        """The sorted entity types when the labels are BIO / IOBES entity tags (NER), else ``None`` (POS)."""
        return entity_types(self.labels)

    @property
    def words(self) -> int:
        return sum(len(sentence.words) for sentence in self.sentences)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "sentences": len(self.sentences), "words": self.words}


# ---------------------------------------------------------------------- label sets
def entity_types(labels: Iterable[str]) -> list[str] | None:
    """Sorted entity types if every label is ``O`` or ``B-``/``I-``/``E-``/``S-`` + type, else ``None``."""
    types = set()
    for label in labels:
        if label == OUTSIDE:
            continue
        match = _ENTITY_TAG.match(label)
        if match is None:
            return None
        types.add(match.group(2))
    return sorted(types) or None


def label_order(tags: Iterable[str]) -> list[str]:
    """The derived label list (see the module docstring): ``O``, then ``B-T``, ``I-T`` … per type; else sorted."""
    present = set(tags)
    types = entity_types(present)
    if types is None:
        return sorted(present)
    prefixes = "BIES" if any(tag[0] in "ES" for tag in present if tag != OUTSIDE) else "BI"
    return [OUTSIDE] + [f"{prefix}-{kind}" for kind in types for prefix in prefixes]


# ---------------------------------------------------------------------- recognising tagged data
def looks_tagged(source: Any, tokens_key: str = "tokens") -> bool | None:
    """Whether data holds tagged sentences, without reading all of it: ``True`` for a CoNLL-style suffix
    (:data:`TAGGED_SUFFIXES`), a JSONL file whose first object has a list under ``tokens_key``, or in-memory
    ``(words, tags)`` pairs of lists; ``False`` for other files and data; ``None`` when it cannot tell (an
    ``hf:`` dataset, a missing or unreadable file, no data)."""
    if source is None:
        return None
    if not isinstance(source, str | Path):
        if not isinstance(source, Sequence) or not source:
            return None  # an iterator is not consumed to peek at it
        first = source[0]
        if isinstance(first, TaggedSentence):
            return True
        return isinstance(first, tuple | list) and len(first) == 2 and all(isinstance(x, list) for x in first)
    if str(source).startswith(HUB_PREFIX):
        return None
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in TAGGED_SUFFIXES:
        return True
    if suffix not in _JSON_SUFFIXES:
        return False
    try:
        with path.open(encoding="utf-8-sig") as handle:
            line = next((line for line in handle if line.strip()), "")
        row = json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return isinstance(row, dict) and isinstance(row.get(tokens_key), list)


# ---------------------------------------------------------------------- public reader
def load_tagged(
    source: str | Path | Sequence[Any],
    labels: Sequence[str] | None = None,
    *,
    tokens_key: str = "tokens",
    tags_key: str = "tags",
) -> TaggedData:
    """Tagged sentences from a CoNLL-style or JSONL file, or in memory (``(words, tags)`` pairs).

    ``labels``: the allowed tags in model order (e.g. the trained model's ``id2label``), which also names
    integer JSONL tags by position; any other tag is an error naming the line. Without it the label list
    is derived from the data (:func:`label_order`).
    """
    allowed = list(labels) if labels is not None else None
    if not isinstance(source, str | Path):
        return _memory_tagged(source, allowed)
    path, raw = read_bytes(source)
    origin, digest = str(path), "sha256:" + hashlib.sha256(raw).hexdigest()
    text = decode_text(path, raw)
    if path.suffix.lower() in _JSON_SUFFIXES:
        sentences = _jsonl_sentences(path, text, allowed, tokens_key, tags_key)
    else:
        sentences = _conll_sentences(path, text, allowed)
    if not sentences:
        raise BadInputError(f"{origin}: no tagged sentence in it (empty, or only -DOCSTART- / blank lines)")
    return TaggedData(sentences, origin, digest, allowed or label_order(_all_tags(sentences)))


# ---------------------------------------------------------------------- formats
def _conll_sentences(path: Path, text: str, allowed: list[str] | None) -> list[TaggedSentence]:
    allowed_set = set(allowed) if allowed is not None else None
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [field.strip() for field in line.split("\t")] if "\t" in line else line.split()
        if not any(fields) or fields[0] == DOCSTART:
            if words:
                sentences.append(TaggedSentence(words, tags))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise BadInputError(
                f"{path}: line {number}: expected a word and its tag separated by a tab or spaces, "
                f"got {line.strip()!r} (no tag)"
            )
        if not fields[0]:
            raise BadInputError(f"{path}: line {number}: empty word before the tag {fields[-1]!r}")
        if not fields[-1]:
            raise BadInputError(f"{path}: line {number}: empty tag after the word {fields[0]!r}")
        _check_tag(fields[-1], allowed_set, f"{path}: line {number}")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append(TaggedSentence(words, tags))
    return sentences


def _jsonl_sentences(
    path: Path, text: str, allowed: list[str] | None, tokens_key: str, tags_key: str
) -> list[TaggedSentence]:
    allowed_set = set(allowed) if allowed is not None else None
    sentences = []
    for number, row in jsonl_rows(path, text):
        where = f"{path}: line {number}"
        for key in (tokens_key, tags_key):
            if key not in row:
                raise BadInputError(f"{where}: no key {key!r} (keys: {', '.join(map(str, row))})")
            if not isinstance(row[key], list):
                raise BadInputError(f"{where}: {key!r} must be a list, got {type(row[key]).__name__}")
        sentence = _sentence(row[tokens_key], row[tags_key], allowed, allowed_set, where)
        if sentence.words:
            sentences.append(sentence)
    return sentences


def _memory_tagged(items: Sequence[Any], allowed: list[str] | None) -> TaggedData:
    allowed_set = set(allowed) if allowed is not None else None
    sentences = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, TaggedSentence):
            item = (item.words, item.tags)
        if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, list | tuple) for x in item)):
            raise BadInputError(f"sentence {number}: expected a (words, tags) pair of lists")
        sentence = _sentence(list(item[0]), list(item[1]), allowed, allowed_set, f"sentence {number}")
        if sentence.words:
            sentences.append(sentence)
    if not sentences:
        raise BadInputError("no tagged sentences")
    content = [[s.words, s.tags] for s in sentences]
    return TaggedData(sentences, MEMORY, memory_sha256(content), allowed or label_order(_all_tags(sentences)))


# ---------------------------------------------------------------------- checks
def _sentence(
    words: list[Any], tags: list[Any], allowed: list[str] | None, allowed_set: set[str] | None, where: str
) -> TaggedSentence:
    if len(words) != len(tags):
        raise BadInputError(f"{where}: {len(words)} tokens but {len(tags)} tags")
    names = []
    for position, (word, tag) in enumerate(zip(words, tags, strict=True), start=1):
        if not isinstance(word, str) or not word.strip():
            raise BadInputError(f"{where}: token {position} is {word!r}, not a non-empty string")
        if isinstance(tag, int) and not isinstance(tag, bool):
            if allowed is None:
                raise BadInputError(f"{where}: integer tag {tag} needs the label list (labels=[...]) to name it")
            if not 0 <= tag < len(allowed):
                raise BadInputError(f"{where}: tag {tag} is out of range for {len(allowed)} labels")
            tag = allowed[tag]
        elif not isinstance(tag, str) or not tag.strip():
            raise BadInputError(f"{where}: tag {position} is {tag!r}, not a non-empty string or a label index")
        tag = tag.strip()
        _check_tag(tag, allowed_set, where)
        names.append(tag)
    return TaggedSentence([word.strip() for word in words], names)


def _check_tag(tag: str, allowed: set[str] | None, where: str) -> None:
    if allowed is not None and tag not in allowed:
        raise BadInputError(f"{where}: unknown tag {tag!r} (expected one of {', '.join(sorted(allowed))})")


def _all_tags(sentences: Iterable[TaggedSentence]) -> set[str]:
    return {tag for sentence in sentences for tag in sentence.tags}
