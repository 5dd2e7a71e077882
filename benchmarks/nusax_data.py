"""NusaX, SMSA and NusaWrites for the DEFT-X sentiment benchmarks, with the SMSA → NusaX test leak removed.

NusaX was translated from a subset of SMSA, so many NusaX *test* sentences stand in SMSA train, verbatim,
lightly edited, or inside a longer review. As in the paper, the task SFT trains on SMSA only after dropping
every row that is a copy or a modified copy of a NusaX test sentence (the Indonesian test text: it aligns
with every language).

Matching rule (``RULE``). Both texts are normalised: NFKC, lower-case, words = runs of letters and digits
(punctuation dropped), and SMSA's detached clitic re-attached ("tempat nya" → "tempatnya", as NusaX writes
it). A row is an *exact* leak if its word sequence equals a test sentence's; a *near* leak if they share
at least ``MIN_SHARED`` word bigrams and those make up at least ``OVERLAP`` of the shorter text's bigrams
(the overlap coefficient |A ∩ B| / min(|A|, |B|)). Taking the shorter side catches a test sentence inside
a multi-sentence review and an SMSA row that NusaX extended; bigrams rather than word sets keep long
reviews from matching a short sentence through its common words (word-set containment ≥ 0.5 flags ~2 900
of 11 000 rows). Per SMSA train row, the best score is bimodal: 10 461 rows below 0.3, a trough of 153
in 0.3–0.6, 386 at 0.6 or more (290 at ≥ 0.9). At 0.4–0.5 about half the pairs are genuine heavy edits
("saya tidak senang dengan produk dari tokopedia" → "Saya tidak kecewa dengan produk apple"); below 0.4
they are stock phrases ("tidak bisa apa-apa", "di malam hari"). The cut errs on removal: a false removal
costs one of 11 000 training rows, a miss leaks a test label.

    python benchmarks/nusax_data.py      # the leak report quoted in benchmarks/RESULTS.md
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Generic, TypeVar

from sftkit.errors import BadInputError
from sftkit.training import load_corpus, load_labelled

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE.parent.parent / "shared" / "data"
CACHE = HERE / "out" / "nusax_data"
LANGUAGES = {
    "ind": "indonesian",
    "ace": "acehnese",
    "ban": "balinese",
    "bjn": "banjarese",
    "mad": "madurese",
    "min": "minangkabau",
}
SPLITS = ("train", "valid", "test")
LABELS = ("negative", "neutral", "positive")
# The repository has no Minangkabau train file, so min uses its valid + *NusaWrites* test paragraphs
# (written independently of NusaX; NusaX test sentences stay unseen either way).
NUSAWRITES_PARTS = {"mad": ("mad-train", "mad-valid"), "min": ("min-valid", "min-test")}
OVERLAP = 0.4
MIN_SHARED = 2
RULE = (
    "words = NFKC lower-cased letter/digit runs, a detached 'nya' re-attached; exact: equal word sequences; "
    f"near: >= {MIN_SHARED} shared word bigrams covering >= {OVERLAP:.0%} of the shorter text's bigrams"
)
_WORD = re.compile(r"[^\W_]+")
T = TypeVar("T")


# ---------------------------------------------------------------------- where the data is
def nusax_path(code: str, split: str) -> Path:
    """A NusaX sentiment split (``id,text,label`` CSV) of one of the six benchmark languages."""
    if code not in LANGUAGES:
        raise BadInputError(f"unknown NusaX language {code!r} (expected one of {', '.join(LANGUAGES)})")
    return DATA_ROOT / "nusax" / "sentiment" / LANGUAGES[code] / f"{_split(split)}.csv"


def smsa_path(split: str) -> Path:
    """An SMSA split: headerless ``text<TAB>label`` TSV."""
    return DATA_ROOT / "smsa" / f"{_split(split)}.tsv"


def nusawrites_paths(code: str) -> list[Path]:
    """The NusaWrites paragraph files used as extra language-SFT text for ``mad`` and ``min``."""
    if code not in NUSAWRITES_PARTS:
        raise BadInputError(f"NusaWrites has paragraphs for mad and min only, not {code!r}")
    return [DATA_ROOT / "nusawrites" / f"paragraph-{part}.csv" for part in NUSAWRITES_PARTS[code]]


def _split(split: str) -> str:
    if split not in SPLITS:
        raise BadInputError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return split


# ---------------------------------------------------------------------- matching
def normalise(text: str) -> tuple[str, ...]:
    """Words as compared: case, punctuation and SMSA's detached "nya" clitic do not count."""
    words: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        if word == "nya" and words:
            words[-1] += word
        else:
            words.append(word)
    return tuple(words)


def _bigrams(words: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(pairwise(words))


@dataclass(frozen=True)
class Match:
    """A text's closest reference: ``kind`` is "exact", "near" or "" (kept); ``score`` its overlap coefficient."""

    kind: str
    score: float
    reference: int | None


class LeakIndex:
    """Reference sentences indexed by word bigram: a text is scored only against those it shares one with."""

    def __init__(self, references: Sequence[str]) -> None:
        self.references = list(references)
        words = [normalise(text) for text in self.references]
        self._exact = {sequence: i for i, sequence in enumerate(words)}
        self._bigrams = [_bigrams(sequence) for sequence in words]
        self._postings: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, bigrams in enumerate(self._bigrams):
            for bigram in bigrams:
                self._postings[bigram].append(i)

    def match(self, text: str) -> Match:
        words = normalise(text)
        if words in self._exact:
            return Match("exact", 1.0, self._exact[words])
        bigrams = _bigrams(words)
        shared = Counter(i for bigram in bigrams for i in self._postings.get(bigram, ()))
        score, reference = max(
            ((n / min(len(bigrams), len(self._bigrams[i])), i) for i, n in shared.items() if n >= MIN_SHARED),
            default=(0.0, None),
        )
        return Match("near" if score >= OVERLAP else "", score, reference)


@dataclass(frozen=True)
class Cleaned(Generic[T]):
    """What survives the leak filter, why the rest went, and (SMSA) the TSV file the trainer reads."""

    kept: list[T]
    report: dict[str, Any]
    path: Path | None = None


def _filter(items: Sequence[T], texts: Sequence[str], index: LeakIndex) -> tuple[list[T], dict[str, Any]]:
    """Keep the items whose text leaks no reference; the report counts and shows pairs near the cut."""
    matches = [index.match(text) for text in texts]
    kept = [item for item, match in zip(items, matches, strict=True) if not match.kind]
    kinds = Counter(match.kind for match in matches)
    scored = sorted((abs(m.score - OVERLAP), i) for i, m in enumerate(matches) if m.kind != "exact" and m.score > 0)
    removed_near = [i for _, i in scored if matches[i].kind][:3]
    kept_near = [i for _, i in scored if not matches[i].kind][:3]
    histogram = Counter(min(int(m.score * 10), 9) / 10 for m in matches)
    return kept, {
        "rule": RULE,
        "thresholds": {"overlap": OVERLAP, "min_shared_bigrams": MIN_SHARED},
        "rows_before": len(items),
        "rows_after": len(kept),
        "removed": len(items) - len(kept),
        "removed_exact": kinds["exact"],
        "removed_near": kinds["near"],
        "references_hit": len({m.reference for m in matches if m.kind}),
        "best_score_histogram": {f"{low:.1f}": histogram[low] for low in sorted(histogram)},
        "borderline": [
            {
                "removed": bool(matches[i].kind),
                "score": round(matches[i].score, 3),
                "text": texts[i],
                "reference": index.references[matches[i].reference],
            }
            for i in removed_near + kept_near
        ],
    }


# ---------------------------------------------------------------------- SMSA
def clean_smsa(
    split: str = "train", cache_dir: Path = CACHE, *, source: Path | None = None, nusax_test: Path | None = None
) -> Cleaned[tuple[str, str]]:
    """SMSA rows minus copies of NusaX test sentences, also written as a headerless TSV under ``cache_dir``.

    The file is named by a digest of both inputs and the rule, so a changed file or rule never reuses a
    stale copy; it is written atomically (temp file + rename), so a reader never sees half of it.
    ``source`` / ``nusax_test`` replace the real files (tests).
    """
    started = time.perf_counter()
    source = source or smsa_path(split)
    nusax_test = nusax_test or nusax_path("ind", "test")
    _check_headerless(source)
    data = load_labelled(source, labels=LABELS)
    references = load_corpus(nusax_test)
    rows = [(example.text, example.label) for example in data.examples]
    kept, report = _filter(rows, [text for text, _ in rows], LeakIndex(references.texts))
    digest = hashlib.sha256(json.dumps([data.sha256, references.sha256, RULE]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"smsa-{source.stem}-{digest}.tsv"
    if not path.exists():
        _write_atomic(path, "".join(f"{text}\t{label}\n" for text, label in kept))
    report.update(source=str(source), references=str(nusax_test), path=str(path))
    report["seconds"] = round(time.perf_counter() - started, 2)
    return Cleaned(kept, report, path)


def _check_headerless(path: Path) -> None:
    """The reader takes a tab-less first line for a one-column header and would blame line 2: say it here."""
    if not path.is_file():
        return  # the reader's own "no such file" error
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if line.count("\t") != 1:
                    raise BadInputError(f"{path}: line {number}: expected text<TAB>label (SMSA has no header row)")
                return


def _write_atomic(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        staging.write_text(content, encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


# ---------------------------------------------------------------------- language-SFT text
def language_texts(code: str, extra: Sequence[str] | None = None) -> list[str]:
    """Unlabelled text for a language SFT: NusaX train + valid of ``code`` (never test), then ``extra``.

    Refuses any text that is (after normalisation) one of the language's test sentences, e.g. test rows
    slipped into ``extra``.
    """
    texts = [text for split in ("train", "valid") for text in load_corpus(nusax_path(code, split)).texts]
    texts += list(extra or ())
    test = {normalise(text) for text in load_corpus(nusax_path(code, "test")).texts}
    leaked = sum(normalise(text) in test for text in texts)
    if leaked:
        raise BadInputError(f"{leaked} of the {code} language-SFT texts are NusaX {code} test sentences")
    return texts


def nusawrites_texts(code: str) -> Cleaned[str]:
    """NusaWrites paragraphs for ``mad`` (train + valid) or ``min`` (valid + test: no train file exists).

    They are not NusaX sentences, but paragraphs that nonetheless match a NusaX test sentence of the same
    language under ``RULE`` are dropped, and counted in the report.
    """
    started = time.perf_counter()
    texts = [text for path in nusawrites_paths(code) for text in load_corpus(path).texts]
    kept, report = _filter(texts, texts, LeakIndex(load_corpus(nusax_path(code, "test")).texts))
    report["sources"] = [str(path) for path in nusawrites_paths(code)]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return Cleaned(kept, report)


# ---------------------------------------------------------------------- report
def _print_report(title: str, report: dict[str, Any]) -> None:
    print(
        f"{title}: {report['rows_before']} → {report['rows_after']} rows, removed {report['removed']} "
        f"({report['removed_exact']} exact, {report['removed_near']} near; "
        f"{report['references_hit']} NusaX test sentences hit) in {report['seconds']:.2f} s"
    )
    print("  best-score histogram:", " ".join(f"{k}:{v}" for k, v in report["best_score_histogram"].items()))
    for pair in report["borderline"]:
        verdict = "removed" if pair["removed"] else "kept"
        print(f"  {verdict} at {pair['score']:.2f}: {pair['text'][:110]!r}\n      ~ {pair['reference'][:110]!r}")


def main() -> None:
    if not DATA_ROOT.is_dir():
        sys.exit(f"the data is not at {DATA_ROOT} (see ../shared/data/MANIFEST.md)")
    print(f"rule: {RULE}")
    for split in ("train", "valid"):
        cleaned = clean_smsa(split)
        _print_report(f"SMSA {split}", cleaned.report)
        print(f"  written to {cleaned.path}")
    for code in NUSAWRITES_PARTS:
        _print_report(f"NusaWrites {code} ({', '.join(NUSAWRITES_PARTS[code])})", nusawrites_texts(code).report)
    for code in LANGUAGES:
        print(f"{code} language-SFT text (NusaX train + valid): {len(language_texts(code))} sentences")


if __name__ == "__main__":
    main()
