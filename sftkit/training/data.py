"""Reading training and evaluation data: text corpora and labelled examples, with errors that name the line.

Formats (chosen by the file's suffix):

- plain text (``.txt`` and anything else): one example per line, blank lines skipped — corpora only;
- ``.csv`` with a header row (NusaX: ``id,text,label``);
- ``.tsv`` with a header row (AmericasNLI: ``id, language, premise, hypothesis, label``) or without one,
  as two fields ``text<TAB>label`` (SMSA);
- ``.jsonl``: one JSON object per line;
- ``hf:owner/name[:config][@split]``: a 🤗 ``datasets`` dataset (needs the optional ``datasets`` extra).

Columns: single texts come from ``text``, pairs from ``premise`` + ``hypothesis`` (chosen automatically
when present), labels from ``label``; all overridable. Every record keeps the SHA-256 of its bytes so
an SFT's metadata says exactly which data made it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.errors import BadInputError, NotFoundError

MEMORY = "<memory>"
HUB_PREFIX = "hf:"
_PAIR_DEFAULT = ("premise", "hypothesis")
_TEXT_DEFAULT = "text"
csv.field_size_limit(1 << 30)  # Wikipedia-sized fields


@dataclass(frozen=True)
class LabelledExample:
    text: str
    label: str
    text_pair: str | None = None


@dataclass(frozen=True)
class Corpus:
    """Unlabelled texts for a language SFT."""

    texts: list[str]
    source: str
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "examples": len(self.texts)}


@dataclass(frozen=True)
class LabelledData:
    """Labelled single texts (sentiment) or text pairs (NLI)."""

    examples: list[LabelledExample]
    source: str
    sha256: str
    pair: bool

    @property
    def labels(self) -> list[str]:
        """The labels present, sorted: the label order of a model trained on this data."""
        return sorted({example.label for example in self.examples})

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "examples": len(self.examples), "pair": self.pair}


# ---------------------------------------------------------------------- public readers
def load_corpus(source: str | Path | Sequence[str], text_column: str | None = None) -> Corpus:
    """Texts from a file, a ``hf:`` dataset, or an in-memory list of strings."""
    if not isinstance(source, str | Path):
        texts = [str(text).strip() for text in source]
        texts = [text for text in texts if text]
        if not texts:
            raise BadInputError("the corpus is empty")
        return Corpus(texts, MEMORY, memory_sha256(texts))
    if str(source).startswith(HUB_PREFIX):
        rows, origin, digest = _hub_rows(str(source))
        column = text_column or _TEXT_DEFAULT
        if rows:
            _check_columns(origin, rows[0][1], {"--text-column": column})
        texts = [str(_field(row, column, origin, line)).strip() for line, row in rows]
        return _nonempty_corpus([text for text in texts if text], origin, digest)
    path, raw = read_bytes(source)
    text = decode_text(path, raw)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if _format(path) == "text":
        texts = [line.strip() for line in text.splitlines()]
    else:
        column = text_column or _TEXT_DEFAULT
        rows = list(_table_rows(path, text, column))
        if rows:
            _check_columns(path, rows[0][1], {"--text-column": column})
        texts = [str(_field(row, column, path, line)).strip() for line, row in rows]
    return _nonempty_corpus([t for t in texts if t], str(path), digest)


def load_labelled(
    source: str | Path | Sequence[Any],
    *,
    pair: bool | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    labels: Sequence[str] | None = None,
) -> LabelledData:
    """Labelled examples from a file, a ``hf:`` dataset, or in memory.

    In memory: ``(text, label)`` or ``(premise, hypothesis, label)`` tuples, or ``LabelledExample``s.
    ``labels`` restricts the allowed labels (e.g. those of the trained model): any other is an error.
    """
    allowed = set(labels) if labels is not None else None
    if not isinstance(source, str | Path):
        return _memory_labelled(source, allowed)
    if str(source).startswith(HUB_PREFIX):
        rows, origin, digest = _hub_rows(str(source))
        rows = list(rows)
        columns = set(rows[0][1]) if rows else set()
    else:
        path, raw = read_bytes(source)
        origin, digest = str(path), "sha256:" + hashlib.sha256(raw).hexdigest()
        if _format(path) == "text":
            raise BadInputError(
                f"{path}: cannot read labels from a plain-text file; use CSV, TSV or JSONL with a label column"
            )
        rows = list(_table_rows(path, decode_text(path, raw), label_column))
        columns = set(rows[0][1]) if rows else set()
    if not rows:
        raise BadInputError(f"{origin}: no examples (the file is empty)")
    use_pair = (
        pair if pair is not None else bool(text_pair_column) or (text_column is None and set(_PAIR_DEFAULT) <= columns)
    )
    first = text_column or (_PAIR_DEFAULT[0] if use_pair else _TEXT_DEFAULT)
    second = (text_pair_column or _PAIR_DEFAULT[1]) if use_pair else None
    flags = {"--text-column": first, "--text-pair-column": second, "--label-column": label_column}
    _check_columns(origin, rows[0][1], {flag: column for flag, column in flags.items() if column})
    examples = []
    for line, row in rows:
        text = str(_field(row, first, origin, line)).strip()
        text_pair = str(_field(row, second, origin, line)).strip() if second else None
        label = str(_field(row, label_column, origin, line)).strip()
        if not text or (second and not text_pair):
            raise BadInputError(f"{origin}: line {line}: empty text")
        if not label:
            raise BadInputError(f"{origin}: line {line}: empty label")
        if allowed is not None and label not in allowed:
            raise BadInputError(
                f"{origin}: line {line}: unknown label {label!r} (expected one of {', '.join(sorted(allowed))})"
            )
        examples.append(LabelledExample(text, label, text_pair))
    return LabelledData(examples, origin, digest, use_pair)


# ---------------------------------------------------------------------- files
def read_bytes(source: str | Path) -> tuple[Path, bytes]:
    """A data file's path and bytes (the bytes are what its sha256 fingerprint covers)."""
    path = Path(source)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    return path, path.read_bytes()


def decode_text(path: Path, raw: bytes) -> str:
    """UTF-8 text (a BOM is dropped); anything else is an error naming the file."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInputError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); convert the file to UTF-8"
        ) from None


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl"}.get(suffix, "text")


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank JSONL line; a line that is not a JSON object is an error."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BadInputError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _table_rows(path: Path, text: str, key_column: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row as dict) for CSV/TSV/JSONL; a headerless two-field TSV reads as text, label."""
    kind = _format(path)
    if kind == "jsonl":
        yield from jsonl_rows(path, text)
        return
    if kind == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
    else:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            return
        header = [name.strip() for name in header]
        if kind == "tsv" and key_column not in header and len(header) == 2:
            header, first = ["text", "label"], header  # SMSA: text<TAB>label, no header row
            yield reader.line_num, dict(zip(header, first, strict=True))
        for row in reader:
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise BadInputError(
                    f"{path}: line {reader.line_num}: {len(row)} fields where the header has {len(header)}"
                )
            yield reader.line_num, dict(zip(header, row, strict=True))
    except csv.Error as exc:
        raise BadInputError(f"{path}: line {reader.line_num}: malformed {kind.upper()} ({exc})") from None


def _check_columns(origin: str | Path, row: dict[str, Any], wanted: dict[str, str]) -> None:
    """Refuse data without the columns asked for, once, naming those found and the flags that choose them.

    Reported per header rather than per row: a file with other column names is the common case (SST,
    SMSA exports), and its fix is a flag, not an edit of line 2.
    """
    missing = {flag: column for flag, column in wanted.items() if column not in row}
    if missing:
        asked = ", ".join(f"{column!r} ({flag})" for flag, column in missing.items())
        raise BadInputError(
            f"{origin}: no column {asked}; the columns are {', '.join(map(str, row))}: "
            f"name the right ones with {' / '.join(f'{flag} NAME' for flag in wanted)}"
        )


def _field(row: dict[str, Any], column: str | None, origin: str | Path, line: int) -> Any:
    if column not in row:
        raise BadInputError(f"{origin}: line {line}: no column {column!r} (columns: {', '.join(map(str, row))})")
    value = row[column]
    if value is None:
        raise BadInputError(f"{origin}: line {line}: column {column!r} is empty")
    return value


def _nonempty_corpus(texts: list[str], origin: str, digest: str) -> Corpus:
    if not texts:
        raise BadInputError(f"{origin}: no text (the file is empty)")
    return Corpus(texts, origin, digest)


# ---------------------------------------------------------------------- memory and Hub
def memory_sha256(items: Any) -> str:
    """Fingerprint of in-memory data, as a file's sha256 fingerprints it."""
    return "sha256:" + hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def _memory_labelled(items: Sequence[Any], allowed: set[str] | None) -> LabelledData:
    examples = []
    for number, item in enumerate(items, start=1):
        if isinstance(item, LabelledExample):
            example = item
        elif isinstance(item, tuple | list) and len(item) == 2:
            example = LabelledExample(str(item[0]), str(item[1]))
        elif isinstance(item, tuple | list) and len(item) == 3:
            example = LabelledExample(str(item[0]), str(item[2]), str(item[1]))
        else:
            raise BadInputError(f"example {number}: expected (text, label) or (premise, hypothesis, label)")
        if allowed is not None and example.label not in allowed:
            raise BadInputError(f"example {number}: unknown label {example.label!r}")
        examples.append(example)
    if not examples:
        raise BadInputError("no labelled examples")
    pairs = {example.text_pair is not None for example in examples}
    if len(pairs) > 1:
        raise BadInputError("mixed single texts and text pairs")
    content = [[e.text, e.text_pair, e.label] for e in examples]
    return LabelledData(examples, MEMORY, memory_sha256(content), pairs.pop())


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:owner/name[:config][@split]`` → (name, config, split); the split defaults to ``train``."""
    body = spec[len(HUB_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise BadInputError(f"{spec!r}: expected hf:owner/name[:config][@split]")
    return name, config or None, split or "train"


def _hub_rows(spec: str) -> tuple[list[tuple[int, dict[str, Any]]], str, str]:
    """Rows of a 🤗 dataset with class labels turned back into their names."""
    name, config, split = parse_hub_spec(spec)
    try:
        import datasets  # an optional dependency (sftkit[datasets]), only for hf: sources
    except ImportError:
        raise BadInputError(
            f"reading {spec} needs the optional 🤗 datasets package (pip install 'sftkit[datasets]'); "
            "or pass a local file"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, RuntimeError, ConnectionError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot load {spec} from the Hugging Face Hub: {first_line}") from None
    names = {
        column: feature.names
        for column, feature in dataset.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    rows = []
    for number, row in enumerate(dataset, start=1):
        for column, label_names in names.items():
            value = row[column]
            if value is None or value < 0:  # unlabelled rows (-1) carry no training signal
                break
            row[column] = label_names[value]
        else:
            rows.append((number, row))
    return rows, spec, f"{spec}#{getattr(dataset, '_fingerprint', 'unknown')}"
