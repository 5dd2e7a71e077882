"""benchmarks/nusax_data.py: the SMSA → NusaX test leak filter, its cached TSV, and clear errors on broken rows."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from sftkit.errors import BadInputError
from sftkit.training import load_corpus, load_labelled

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)  # benchmarks is a folder of scripts, not a package
try:
    nd = importlib.import_module("nusax_data")
finally:
    sys.path.remove(BENCHMARKS)

needs_data = pytest.mark.skipif(not nd.DATA_ROOT.is_dir(), reason=f"real data not available at {nd.DATA_ROOT}")

REFERENCE = "Pelayanan hotel ini sangat buruk, kamarnya kotor dan bau."
ROWS = {
    "verbatim": ("pelayanan hotel ini sangat buruk , kamar nya kotor dan bau .", "negative"),
    "edited": ("PELAYANAN hotel itu sangat buruk!! kamarnya kotor dan bau", "negative"),
    "document": (
        "kami menginap dua malam di bandung . pelayanan hotel ini sangat buruk , kamar nya kotor dan bau . "
        "sarapan lumayan enak tapi kami tidak akan kembali .",
        "negative",
    ),
    "extended by NusaX": ("pelayanan hotel ini sangat buruk", "negative"),
    "unrelated": ("sate ayam nya enak sekali dan harga nya murah .", "positive"),
}


def _write_inputs(tmp_path: Path, rows: list[tuple[str, str]]) -> tuple[Path, Path]:
    source = tmp_path / "smsa.tsv"
    source.write_text("".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    test = tmp_path / "test.csv"
    test.write_text(f'id,text,label\n1,"{REFERENCE}",negative\n2,"Macet di mana-mana.",negative\n', encoding="utf-8")
    return source, test


def test_match_kinds():
    index = nd.LeakIndex([REFERENCE, "Macet di mana-mana."])
    kinds = {name: index.match(text).kind for name, (text, _) in ROWS.items()}
    assert kinds == {
        "verbatim": "exact",
        "edited": "near",
        "document": "near",
        "extended by NusaX": "near",
        "unrelated": "",
    }
    assert index.match(ROWS["edited"][0]).reference == 0


def test_clean_smsa_keeps_unrelated_rows_and_writes_a_readable_cached_tsv(tmp_path):
    source, test = _write_inputs(tmp_path, list(ROWS.values()))
    cache = tmp_path / "cache"
    cleaned = nd.clean_smsa(cache_dir=cache, source=source, nusax_test=test)
    assert cleaned.kept == [ROWS["unrelated"]]
    report = cleaned.report
    assert (report["rows_before"], report["rows_after"], report["removed"]) == (5, 1, 4)
    assert (report["removed_exact"], report["removed_near"], report["references_hit"]) == (1, 3, 1)
    assert [(e.text, e.label) for e in load_labelled(cleaned.path).examples] == cleaned.kept
    assert [p.name for p in cache.iterdir()] == [cleaned.path.name]  # no temp file left behind

    assert nd.clean_smsa(cache_dir=cache, source=source, nusax_test=test).path == cleaned.path
    source.write_text(source.read_text(encoding="utf-8") + "enak\tpositive\n", encoding="utf-8")
    assert nd.clean_smsa(cache_dir=cache, source=source, nusax_test=test).path != cleaned.path


@pytest.mark.parametrize(
    ("content", "line", "says"),
    [
        ("rusak tanpa tab\nbagus\tpositive\n", 1, "expected text<TAB>label"),
        ("bagus\tpositive\nrusak tanpa tab\n", 2, "1 fields"),
        ("bagus\tpositive\nenak\tgood\n", 2, "unknown label 'good'"),
    ],
)
def test_broken_smsa_row_is_one_clear_error(tmp_path, content, line, says):
    _, test = _write_inputs(tmp_path, [])
    source = tmp_path / "broken.tsv"
    source.write_text(content, encoding="utf-8")
    with pytest.raises(BadInputError) as caught:
        nd.clean_smsa(cache_dir=tmp_path / "cache", source=source, nusax_test=test)
    message = str(caught.value)
    assert message.startswith(f"{source}: line {line}: ") and says in message and "\n" not in message


@pytest.mark.data
@needs_data
def test_real_smsa_train_loses_every_nusax_test_copy(tmp_path):
    cleaned = nd.clean_smsa("train", tmp_path)
    report = cleaned.report
    assert report["rows_before"] == 11_000 and report["rows_after"] == len(cleaned.kept)
    # The manifest measured 110 test sentences verbatim in SMSA train; edits and documents add more.
    assert report["removed_exact"] >= 110 and 200 <= report["removed"] <= 1_000
    test = {nd.normalise(text) for text in load_corpus(nd.nusax_path("ind", "test")).texts}
    assert not [text for text, _ in cleaned.kept if nd.normalise(text) in test]


@pytest.mark.data
@needs_data
def test_real_language_texts_never_take_test_sentences():
    assert len(nd.language_texts("ace")) == 600
    test_sentence = load_corpus(nd.nusax_path("ace", "test")).texts[0]
    with pytest.raises(BadInputError, match="1 of the ace language-SFT texts"):
        nd.language_texts("ace", extra=[test_sentence.upper()])


@pytest.mark.data
@needs_data
@pytest.mark.parametrize(("code", "paragraphs"), [("mad", 4011), ("min", 2608)])
def test_real_nusawrites_paragraphs_are_almost_all_kept(code, paragraphs):
    report = nd.nusawrites_texts(code).report
    assert report["rows_before"] == paragraphs and report["removed"] <= paragraphs // 100
