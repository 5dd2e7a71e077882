"""Overlap analytics: every statistic against a plain set computation, JSON against its schema, plots as images,
and the ``sftkit overlap`` command end to end (registry references and SFT directories)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sftkit import overlap, plots
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.params import layer_of, module_of
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning

ROOT = Path(__file__).resolve().parents[1]

# Encoder-relative names covering every module kind and the layer-less embeddings.
SHAPES = {
    "embeddings.word_embeddings.weight": (40, 8),
    "embeddings.position_embeddings.weight": (10, 8),
    **{
        f"encoder.layer.{layer}.{part}": shape
        for layer in (0, 1)
        for part, shape in {
            "attention.self.query.weight": (8, 8),
            "attention.self.query.bias": (8,),
            "attention.self.key.weight": (8, 8),
            "attention.self.value.weight": (8, 8),
            "attention.output.dense.weight": (8, 8),
            "attention.output.dense.bias": (8,),
            "intermediate.dense.weight": (16, 8),
            "intermediate.dense.bias": (16,),
            "output.dense.weight": (8, 16),
        }.items()
    },
}
FINGERPRINT = "sha256:" + "ab" * 32


def random_sft(
    seed: int,
    density: float,
    skip: tuple[str, ...] = (),
    kind: str = "language",
    name: str = "xx",
    method: str = "deftx",
    fingerprint: str | None = FINGERPRINT,
    base_model: str | None = "tiny-base",
    dtype: torch.dtype = torch.float32,
) -> SparseFineTuning:
    """Random entries per parameter; values include exact zeros so sign agreement's zero case is exercised."""
    rng = np.random.default_rng(seed)
    diffs = {}
    for name_, shape in SHAPES.items():
        if name_ in skip:
            continue
        numel = int(np.prod(shape))
        chosen = np.flatnonzero(rng.random(numel) < density)
        values = rng.standard_normal(chosen.size).astype(np.float32)
        values[rng.random(chosen.size) < 0.1] = 0.0
        diffs[name_] = SparseDelta(shape, torch.from_numpy(chosen), torch.from_numpy(values).to(dtype))
    meta = SFTMetadata(
        kind=kind,
        language=name if kind == "language" else None,
        task=name if kind == "task" else None,
        labels=["a", "b"] if kind == "task" else None,
        method=method,
        base_model=base_model,
        base_fingerprint=fingerprint,
    )
    head = {"classifier.out_proj.weight": torch.randn(2, 8)} if kind == "task" else {}
    return SparseFineTuning(diffs, head, meta)


# ------------------------------------------------------------------------------------ set-based reference
def entry_map(sft: SparseFineTuning) -> dict[tuple[str, int], float]:
    return {
        (name, int(i)): float(v)
        for name, delta in sft.diffs.items()
        for i, v in zip(delta.indices.tolist(), delta.values.float().tolist(), strict=True)
    }


def sign(value: float) -> int:
    return (value > 0) - (value < 0)


def reference_stats(a: dict, b: dict) -> dict:
    """The obvious computation with Python sets of (parameter name, flat index)."""
    shared = set(a) & set(b)
    union = set(a) | set(b)

    def ratio(x, y):
        return x / y if y else None

    same = sum(sign(a[key]) == sign(b[key]) for key in shared)
    abs_a, abs_b = sum(abs(a[key]) for key in shared), sum(abs(b[key]) for key in shared)
    return {
        "entries_a": len(a),
        "entries_b": len(b),
        "shared": len(shared),
        "union": len(union),
        "same_sign": same,
        "frac_of_a": ratio(len(shared), len(a)),
        "frac_of_b": ratio(len(shared), len(b)),
        "jaccard": ratio(len(shared), len(union)),
        "overlap": ratio(len(shared), min(len(a), len(b))),
        "sign_agreement": ratio(same, len(shared)),
        "mean_abs_a": ratio(abs_a, len(shared)),
        "mean_abs_b": ratio(abs_b, len(shared)),
        "abs_ratio": ratio(abs_a, abs_b) if shared else None,
    }


def reference_groups(a: dict, b: dict, key) -> dict[str, dict]:
    names = {name for name, _ in a} | {name for name, _ in b}
    groups = {key(name) for name in names}
    return {
        group: reference_stats(
            {k: v for k, v in a.items() if key(k[0]) == group}, {k: v for k, v in b.items() if key(k[0]) == group}
        )
        for group in groups
    }


def layer_key(name: str) -> str:
    layer = layer_of(name)
    return "none" if layer is None else str(layer)


def assert_stats_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value is None or isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9), key


PAIRS = [
    pytest.param(dict(seed=1, density=0.3), dict(seed=2, density=0.1), id="random"),
    pytest.param(
        dict(seed=3, density=0.6),
        dict(seed=4, density=0.5, skip=("encoder.layer.1.output.dense.weight",)),
        id="dense-with-missing-parameter",
    ),
    pytest.param(dict(seed=5, density=0.02), dict(seed=6, density=0.02), id="sparse"),
    pytest.param(dict(seed=7, density=0.0), dict(seed=8, density=0.2), id="empty-a"),
    pytest.param(
        dict(seed=9, density=0.2, dtype=torch.bfloat16),
        dict(seed=10, density=0.3, dtype=torch.float16),
        id="half-values",
    ),
]


@pytest.mark.parametrize(("spec_a", "spec_b"), PAIRS)
def test_every_statistic_equals_the_set_computation(spec_a, spec_b):
    a, b = random_sft(**spec_a), random_sft(**spec_b, kind="task", name="nli")
    entries_a, entries_b = entry_map(a), entry_map(b)
    pair = overlap.pair_overlap(a, b)
    assert_stats_equal(pair.total.to_dict(), reference_stats(entries_a, entries_b))
    for grouping, key in (("layer", layer_key), ("module", module_of)):
        got = {group: counts.to_dict() for group, counts in pair.by(grouping)}
        expected = reference_groups(entries_a, entries_b, key)
        assert got.keys() == expected.keys()
        for group in expected:
            assert_stats_equal(got[group], expected[group])
    swapped = overlap.pair_overlap(b, a).total
    assert swapped.to_dict() == pair.total.swapped().to_dict()


def test_breakdown_groups_come_in_model_order():
    pair = overlap.pair_overlap(random_sft(1, 0.3), random_sft(2, 0.3))
    assert [group for group, _ in pair.by("layer")] == ["none", "0", "1"]
    assert [group for group, _ in pair.by("module")] == [
        "embeddings",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.o",
        "ffn.in",
        "ffn.out",
        "bias",
    ]


def test_definitions_on_a_hand_made_pair():
    """A = {0,1,2,3}, B = {2,…,7} in one parameter: the documented formulas, spelled out."""
    shape = (8,)
    name = "encoder.layer.0.intermediate.dense.weight"
    a = SparseFineTuning({name: SparseDelta(shape, torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 2.0, -4.0]))})
    b = SparseFineTuning({name: SparseDelta(shape, torch.arange(2, 8), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))})
    total = overlap.pair_overlap(a, b).total
    assert (total.shared, total.union) == (2, 8)
    assert total.frac_of_a == 0.5 and total.frac_of_b == pytest.approx(1 / 3)
    assert total.jaccard == 0.25
    assert total.overlap == 0.5  # 2 / min(4, 6)
    assert total.sign_agreement == 0.5  # +2 vs +1 agree, −4 vs +1 disagree
    assert (total.mean_abs_a, total.mean_abs_b, total.abs_ratio) == (3.0, 1.0, 3.0)


def test_empty_sfts_give_undefined_fractions_not_errors():
    empty = random_sft(1, 0.0)
    total = overlap.pair_overlap(empty, empty).total
    assert total.shared == 0
    assert all(total.statistic(s) is None for s in overlap.STATISTICS if s != "shared")


def test_heads_are_ignored_and_the_model_is_never_densified(monkeypatch):
    a, b = random_sft(1, 0.3), random_sft(2, 0.3, kind="task", name="sa")
    headless = SparseFineTuning(b.diffs, {}, b.metadata)
    monkeypatch.setattr(SparseDelta, "to_dense", lambda *_: pytest.fail("densified a delta"))
    assert overlap.pair_overlap(a, b).total == overlap.pair_overlap(a, headless).total


def test_matrix_cells_are_the_pairwise_statistics():
    sfts = [random_sft(seed, density, name=f"l{seed}") for seed, density in ((1, 0.1), (2, 0.3), (3, 0.5), (4, 0.2))]
    matrix = overlap.overlap_matrix(sfts)
    assert matrix.labels == ["l1", "l2", "l3", "l4"]
    assert len(matrix.pairs) == 6
    maps = [entry_map(s) for s in sfts]
    for statistic in overlap.STATISTICS:
        values = matrix.matrix(statistic)
        for i in range(4):
            for j in range(4):
                expected = reference_stats(maps[i], maps[j])[statistic]
                assert values[i][j] == pytest.approx(expected, rel=1e-9), (statistic, i, j)
    assert matrix.matrix("overlap")[2][2] == 1.0
    frac_a, frac_b = matrix.matrix("frac_of_a"), matrix.matrix("frac_of_b")
    assert frac_a[0][2] == frac_b[2][0] != frac_a[2][0]


def test_overlap_by_method_matches_pairs_and_lists_shared_sfts_once():
    task = {
        method: random_sft(10 + i, 0.3, kind="task", name="nli", method=method)
        for i, method in enumerate(("deftx", "lt-sft"))
    }
    languages = {
        (language, method): random_sft(seed, 0.2, name=language, method=method)
        for seed, (language, method) in enumerate(
            [("ace", "deftx"), ("ace", "lt-sft"), ("ban", "deftx"), ("ban", "lt-sft")]
        )
    }
    comparison = overlap.overlap_by_method([(sft, task[method], method) for (_, method), sft in languages.items()])
    assert comparison.languages == ["ace", "ban"]
    assert comparison.methods == ["deftx", "lt-sft"]
    assert len(comparison.items) == 6  # 4 language SFTs + 2 task SFTs, each listed once
    table = comparison.table("jaccard")
    for (language, method), sft in languages.items():
        expected = reference_stats(entry_map(sft), entry_map(task[method]))["jaccard"]
        assert table[method][comparison.languages.index(language)] == pytest.approx(expected, rel=1e-9)
    lonely = overlap.overlap_by_method([(languages[("ace", "deftx")], task["deftx"], "deftx")])
    assert lonely.table() == {"deftx": [pytest.approx(languages_overlap(languages[("ace", "deftx")], task["deftx"]))]}
    with pytest.raises(BadInputError, match="two language SFTs for 'ace'"):
        overlap.overlap_by_method(
            [(languages[("ace", "deftx")], task["deftx"], "m"), (languages[("ace", "lt-sft")], task["deftx"], "m")]
        )
    with pytest.raises(BadInputError, match=r"no .* triple"):
        overlap.overlap_by_method([])


def languages_overlap(a: SparseFineTuning, b: SparseFineTuning) -> float:
    return reference_stats(entry_map(a), entry_map(b))["overlap"]


def test_different_bases_are_refused():
    a = random_sft(1, 0.2)
    with pytest.raises(BaseMismatchError, match="different bases"):
        overlap.pair_overlap(a, random_sft(2, 0.2, fingerprint="sha256:" + "cd" * 32))
    with pytest.raises(BaseMismatchError, match="other-base"):
        overlap.overlap_matrix([a, random_sft(3, 0.2), random_sft(2, 0.2, fingerprint=None, base_model="other-base")])
    # The fingerprint decides when both have one: a renamed copy of the same base is the same base.
    overlap.pair_overlap(a, random_sft(2, 0.2, base_model="local/copy-of-tiny-base"))
    wrong_shape = random_sft(4, 0.2, fingerprint=None, base_model=None)
    name = "encoder.layer.0.intermediate.dense.weight"
    wrong_shape.diffs[name] = SparseDelta((32, 8), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(BaseMismatchError, match="shape"):
        overlap.pair_overlap(a, wrong_shape)


def test_bad_arguments_are_bad_input():
    pair = overlap.pair_overlap(random_sft(1, 0.2), random_sft(2, 0.2))
    with pytest.raises(BadInputError, match="layer' or 'module"):
        pair.by("head")
    with pytest.raises(BadInputError, match="unknown statistic"):
        pair.total.statistic("cosine")
    with pytest.raises(BadInputError, match="at least 2"):
        overlap.overlap_matrix([random_sft(1, 0.2)])


# ------------------------------------------------------------------------------------ JSON schema
def validator():
    import jsonschema  # a dev dependency: the check must run, not skip

    jsonschema.Draft202012Validator.check_schema(overlap.JSON_SCHEMA)
    return jsonschema.Draft202012Validator(overlap.JSON_SCHEMA)


def json_documents() -> dict[str, dict]:
    sfts = [random_sft(seed, 0.2, name=f"l{seed}") for seed in range(3)]
    task = random_sft(9, 0.3, kind="task", name="nli")
    documents = {}
    for by in (None, "layer", "module"):
        documents[f"pair-{by}"] = overlap.overlap_matrix(sfts[:2]).to_json(by)
        documents[f"matrix-{by}"] = overlap.overlap_matrix(sfts).to_json(by)
        documents[f"methods-{by}"] = overlap.overlap_by_method([(s, task, "deftx") for s in sfts]).to_json(by)
    documents["empty"] = overlap.overlap_matrix([random_sft(1, 0.0), random_sft(2, 0.0)]).to_json("module")
    return documents


def test_json_documents_validate_against_the_documented_schema():
    check = validator()
    for name, document in json_documents().items():
        roundtrip = json.loads(json.dumps(document))  # exactly what --json prints
        errors = [error.message for error in check.iter_errors(roundtrip)]
        assert not errors, (name, errors)
    pair = json_documents()["pair-layer"]
    assert pair["mode"] == "pair" and [g["group"] for g in pair["pairs"][0]["groups"]] == ["none", "0", "1"]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.pop("sfts"),
        lambda d: d["pairs"][0]["total"].pop("jaccard"),
        lambda d: d["pairs"][0]["total"].update(shared=-1),
        lambda d: d["pairs"][0]["groups"][0].update(extra=1),
        lambda d: d.update(mode="triangle"),
        lambda d: d.pop("matrix"),
        lambda d: d["matrix"].update(overlap="high"),
    ],
)
def test_the_schema_check_rejects_malformed_documents(corrupt):
    document = json.loads(json.dumps(json_documents()["matrix-layer"]))
    corrupt(document)
    assert not validator().is_valid(document)


def test_docs_carry_the_same_schema_as_the_code():
    text = (ROOT / "docs" / "overlap.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- schema -->\s*```json\n(.*?)```", text, re.S)
    assert block, "docs/overlap.md lost its schema block"
    assert json.loads(block.group(1)) == json.loads(json.dumps(overlap.JSON_SCHEMA))
    for field in overlap.JSON_SCHEMA["$defs"]["statistics"]["required"]:
        assert f"`{field}`" in text


# ------------------------------------------------------------------------------------ plots
def image(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.format, img.size, len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_heatmap_and_bars_are_valid_images(tmp_path):
    matrix = overlap.overlap_matrix([random_sft(seed, 0.2, name=f"l{seed}") for seed in range(4)])
    heat = plots.plot_matrix(matrix, tmp_path / "fig3.png", size=(5, 4), dpi=100)
    assert image(heat)[:2] == ("PNG", (500, 400))
    assert image(heat)[2] > 50  # a colour map, not an empty canvas
    task = random_sft(9, 0.3, kind="task", name="nli")
    comparison = overlap.overlap_by_method(
        [
            (random_sft(s, 0.2, name=lang, method=m), task, m)
            for s, (lang, m) in enumerate([("ace", "a"), ("ace", "b"), ("ban", "a")])
        ]
    )
    bars = plots.plot_methods(comparison, tmp_path / "fig2.png", "jaccard", size=(6, 3), dpi=100)
    assert image(bars)[:2] == ("PNG", (600, 300))
    breakdown = plots.plot_breakdown(matrix.pair(0, 1), tmp_path / "layers.png", by="module", dpi=80)
    assert image(breakdown)[0] == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig2.png", "fig3.png", "layers.png"]  # no temp files left


def test_plot_paths_are_checked(tmp_path):
    with pytest.raises(BadInputError, match="extensions"):
        plots.check_path(tmp_path / "fig.docx")
    with pytest.raises(BadInputError, match="does not exist"):
        plots.check_path(tmp_path / "missing" / "fig.png")
    with pytest.raises(BadInputError, match="3 values for 2 categories"):
        plots.grouped_bars(["a", "b"], {"m": [0.1, 0.2, 0.3]}, tmp_path / "x.png")
    assert plots.format_value(0.1234, "overlap") == "12.3"
    assert plots.format_value(None, "overlap") == "–"
    assert math.isnan(plots._scaled(None, "overlap"))


# ------------------------------------------------------------------------------------ command line
@pytest.fixture
def populated(sftkit_home, tmp_path):
    """A registry with language SFTs ace and ban (version 1 lt-sft, version 2 = latest deftx), bjn, a task nli (same
    two versions) and an SFT of another base; returns their directories by name."""
    from sftkit.registry import Registry

    specs = {
        "ace-lt": dict(seed=2, density=0.25, name="ace", method="lt-sft"),
        "ace": dict(seed=1, density=0.2, name="ace"),
        "ban-lt": dict(seed=4, density=0.1, name="ban", method="lt-sft"),
        "ban": dict(seed=3, density=0.3, name="ban"),
        "bjn": dict(seed=5, density=0.15, name="bjn"),
        "nli-lt": dict(seed=7, density=0.35, kind="task", name="nli", method="lt-sft"),
        "nli": dict(seed=6, density=0.3, kind="task", name="nli"),
        "other": dict(seed=8, density=0.2, name="oth", fingerprint="sha256:" + "cd" * 32, base_model="other-base"),
    }
    registry = Registry.open()
    directories = {}
    for key, spec in specs.items():
        directories[key] = random_sft(**spec).save(tmp_path / "sfts" / key)
        registry.add(directories[key])
    return directories


def run_cli(*args: str):
    from typer.testing import CliRunner

    from sftkit.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def loaded(directory: Path) -> SparseFineTuning:
    return SparseFineTuning.load(directory)


def test_cli_pair_json_is_valid_and_matches_the_library(populated):
    result = run_cli("overlap", "ace", "nli", "--by", "module", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert validator().is_valid(document)
    assert document["mode"] == "pair" and document["by"] == "module"
    assert [s["label"] for s in document["sfts"]] == ["ace", "nli"]
    assert [s["reference"] for s in document["sfts"]] == ["lang:ace@2", "task:nli@2"]
    expected = overlap.pair_overlap(loaded(populated["ace"]), loaded(populated["nli"]))
    assert document["pairs"][0]["total"] == pytest.approx(expected.total.to_dict())
    assert [g["group"] for g in document["pairs"][0]["groups"]] == [group for group, _ in expected.by("module")]


def test_cli_pair_tables_show_definitions_totals_and_breakdown(populated):
    total = overlap.pair_overlap(loaded(populated["ace"]), loaded(populated["nli"])).total
    result = run_cli("overlap", "ace", "nli")
    assert result.exit_code == 0, result.output
    assert "A = ace (lang:ace@2)" in result.stdout
    assert re.search(
        r"overlap %\s+" + re.escape(plots.format_value(total.overlap, "overlap")) + r"\s+shared / min\(\|A\|, \|B\|\)",
        result.stdout,
    )
    assert re.search(rf"shared entries\s+{total.shared:,}\s", result.stdout)
    by_layer = run_cli("overlap", "ace", "nli", "--by", "layer")
    assert by_layer.exit_code == 0, by_layer.output
    for group in ("none", "0", "1", "total"):
        assert re.search(rf"^ {group}\s+\d", by_layer.stdout, re.M), group


def test_cli_matrix_with_heatmap_and_directory_references(populated, tmp_path):
    figure = tmp_path / "fig3.png"
    refs = ["ace", str(populated["ban"]), "lang:bjn@1"]
    result = run_cli("overlap", *refs, "--stat", "jaccard", "--plot", figure, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert validator().is_valid(document)
    assert document["mode"] == "matrix" and len(document["pairs"]) == 3
    matrix = overlap.overlap_matrix([loaded(populated[k]) for k in ("ace", "ban", "bjn")])
    for statistic in overlap.STATISTICS:
        assert document["matrix"][statistic] == matrix.matrix(statistic)  # JSON floats round-trip exactly
    assert image(figure)[0] == "PNG"
    table = run_cli("overlap", *refs, "--stat", "jaccard", "--by", "module")
    assert table.exit_code == 0, table.output
    assert plots.format_value(matrix.matrix("jaccard")[0][2], "jaccard") in table.stdout
    assert "ace–lang:bjn@1" in table.stdout and "ban–lang:bjn@1" in table.stdout and "attn.v" in table.stdout
    assert [s["label"] for s in document["sfts"]] == ["ace", "ban", "lang:bjn@1"]  # a directory by its name


def test_cli_language_vs_task_per_method(populated, tmp_path):
    figure = tmp_path / "fig2.png"
    languages = [populated[k] for k in ("ace", "ace-lt", "ban", "ban-lt")]
    result = run_cli(
        "overlap", *languages, "--task", populated["nli"], "--task", populated["nli-lt"], "--plot", figure, "--json"
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert validator().is_valid(document)
    assert (document["mode"], document["languages"], document["methods"]) == (
        "methods",
        ["ace", "ban"],
        ["deftx", "lt-sft"],
    )
    for pair in document["pairs"]:
        key = pair["language"] + ("-lt" if pair["method"] == "lt-sft" else "")
        task = "nli-lt" if pair["method"] == "lt-sft" else "nli"
        expected = overlap.pair_overlap(loaded(populated[key]), loaded(populated[task])).total.to_dict()
        assert pair["total"] == pytest.approx(expected)
    assert image(figure)[0] == "PNG"
    table = run_cli("overlap", "ace", "ban", "--task", "nli", "--stat", "shared")
    assert table.exit_code == 0, table.output
    assert "deftx" in table.stdout and "lt-sft" not in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "at least 2"),
        (("ace",), "at least 2"),
        (("ace", "no-such-sft"), "no-such-sft"),
        (("ace", "oth"), "different bases"),
        (("ace", "nli", "--by", "head"), "'layer' or 'module'"),
        (("ace", "nli", "--stat", "cosine"), "unknown --stat"),
        (("ace", "nli", "--plot", "fig.docx"), "extensions"),
        (("ace", "--task", "ban"), "not a task SFT"),
        (("nli", "--task", "nli"), "give language SFTs"),
        (("lang:ace@1", "--task", "task:nli@2"), "'lt-sft' but no --task"),
        (("--task", "nli"), "at least one language SFT"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(populated, args, message):
    result = run_cli("overlap", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_cli_module_imports_no_torch():
    code = "import sys, cli.commands.overlap; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
