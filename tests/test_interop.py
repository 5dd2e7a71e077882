"""LT-SFT interop: reading composable-sft files safely and exactly, writing them back, and the CLI.

The LT-SFT writer here is a test helper built from the format's facts alone (issue 8), independent of
``sftkit.interop``: column-major flat indices, index steps with a numpy int64 first element, empty
entries for untouched parameters, full-model names. So is ``reference_apply``, the reference's
``SFT.apply`` semantics that an import + composition must reproduce exactly (issue 12).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from sftkit.artifact import LTSFT_FILE, SIDECAR_NAME
from sftkit.base_model import load_base
from sftkit.compose import compose
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.fingerprint import base_fingerprint
from sftkit.interop import detect_format, export_sft, import_sft
from sftkit.interop.ltsft import convert_flat_indices, read_ltsft
from sftkit.params import head_parameters, maskable_parameters
from sftkit.sft import SFTMetadata, SparseFineTuning

LABELS = ["negative", "neutral", "positive"]


# ------------------------------------------------------------------ reference-format helpers (from the facts)
def encode_reference(dense: torch.Tensor) -> dict:
    """Encode a dense delta as composable-sft does: column-major flat indices, steps, numpy first index."""
    size = list(dense.shape)
    coordinates = dense.nonzero().numpy().T.astype(np.int64)  # (ndim, nnz)
    multipliers = np.cumprod([1, *size[:-1]], dtype=np.int64)
    flat = multipliers @ coordinates
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    values = dense[tuple(torch.from_numpy(coordinates[:, order]))]
    steps = (flat[1:] - flat[:-1]).tolist()
    index_steps = [flat[0], *steps] if len(flat) else []  # flat[0] is a numpy int64 scalar
    return {"size": dense.size(), "index_steps": index_steps, "values": values}


def reference_coordinates(entry: dict) -> tuple[torch.Tensor, ...]:
    """Per-dimension coordinates of an entry's column-major flat indices (no sftkit code involved)."""
    size = list(entry["size"])
    flat = np.cumsum(np.array([int(s) for s in entry["index_steps"]], dtype=np.int64))
    divisors = np.cumprod([1, *size[:-1]], dtype=np.int64)
    coordinates = (flat[None, :] // divisors[:, None]) % np.array(size)[:, None]
    return tuple(torch.from_numpy(coordinates))


def decode_reference(entry: dict) -> torch.Tensor:
    """Decode an entry with the column-major facts."""
    dense = torch.zeros(list(entry["size"]), dtype=entry["values"].dtype)
    dense[reference_coordinates(entry)] = entry["values"]
    return dense


def load_reference_file(directory: Path) -> dict:
    """The payload the reference's ``SFT(path)`` reads (a file this module wrote, so a plain load is safe)."""
    return torch.load(directory / LTSFT_FILE, weights_only=False)


def reference_apply(model: torch.nn.Module, payload: dict, with_abs: bool) -> None:
    """composable-sft's ``SFT.apply(model, with_abs)``: add each diff's values at its column-major flat
    indices of the parameter of that name, then copy the ``abs`` tensors only ``with_abs`` (a language SFT
    is applied with ``with_abs=False``: its abs is ignored, whatever it holds). A bare encoder's names lack
    the full-model prefix, which is therefore dropped there."""
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = f"{model.base_model_prefix}."
    with torch.no_grad():
        for name, entry in payload["diffs"].items():
            param = params[name if name in params else name.removeprefix(prefix)]
            param.index_put_(reference_coordinates(entry), entry["values"].to(param.dtype), accumulate=True)
        for name, tensor in payload["abs"].items() if with_abs else ():
            params[name].copy_(tensor)


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = dict(expected.named_parameters(remove_duplicate=False))
    assert params.keys() == wanted.keys()
    for name, param in params.items():
        assert torch.equal(param, wanted[name]), name


def sparse_random(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    return values * (torch.rand(shape, generator=generator) < density)


@pytest.fixture(scope="module")
def base_mlm(tiny_base):
    return AutoModelForMaskedLM.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def task_ltsft(tmp_path_factory, base_mlm):
    """An LT-SFT task directory as composable-sft writes it, with its dense deltas and head."""
    generator = torch.Generator().manual_seed(7)
    params = dict(base_mlm.roberta.named_parameters())
    hidden = params["embeddings.word_embeddings.weight"].shape[1]
    deltas = {
        "embeddings.word_embeddings.weight": sparse_random(
            params["embeddings.word_embeddings.weight"].shape, 0.05, generator
        ),
        "encoder.layer.0.intermediate.dense.weight": sparse_random((4 * hidden, hidden), 0.1, generator),
        "encoder.layer.1.output.dense.weight": sparse_random((hidden, 4 * hidden), 0.1, generator),
        "encoder.layer.1.attention.self.query.bias": sparse_random((hidden,), 0.3, generator),
        "encoder.layer.0.attention.self.key.weight": torch.zeros(hidden, hidden),  # untouched: empty steps
    }
    head = {
        "classifier.dense.weight": torch.randn(hidden, hidden, generator=generator),
        "classifier.dense.bias": torch.randn(hidden, generator=generator),
        "classifier.out_proj.weight": torch.randn(len(LABELS), hidden, generator=generator),
        "classifier.out_proj.bias": torch.randn(len(LABELS), generator=generator),
    }
    payload = {
        "diffs": {f"roberta.{name}": encode_reference(delta) for name, delta in deltas.items()},
        "abs": head,
    }
    assert isinstance(payload["diffs"]["roberta.encoder.layer.0.intermediate.dense.weight"]["index_steps"][0], np.int64)
    assert payload["diffs"]["roberta.encoder.layer.0.attention.self.key.weight"]["index_steps"] == []
    directory = tmp_path_factory.mktemp("ltsft-task")
    torch.save(payload, directory / LTSFT_FILE)
    return directory, deltas, head


# ------------------------------------------------------------------ index maths
def test_index_conversion_matches_coordinates():
    shape = (3, 5, 7)
    dense = torch.arange(1, 106, dtype=torch.float32).reshape(shape)
    rows = torch.arange(105)
    columns = convert_flat_indices(rows, shape, to_row_major=False)
    # column-major index of (i, j, k) is i + 3 j + 15 k
    expected = torch.tensor([i + 3 * j + 15 * k for i in range(3) for j in range(5) for k in range(7)])
    assert torch.equal(columns, expected)
    assert torch.equal(convert_flat_indices(columns, shape, to_row_major=True), rows)
    assert torch.equal(dense.reshape(-1)[rows], dense.permute(2, 1, 0).reshape(-1)[columns])


# ------------------------------------------------------------------ import
def test_ltsft_imports_exactly_the_encoded_deltas(task_ltsft):
    directory, deltas, head = task_ltsft
    assert detect_format(directory) == "lt-sft"
    result = read_ltsft(directory, {"task": "sa", "labels": LABELS})
    sft = result.sft
    assert set(sft.diffs) == set(deltas)
    for name, dense in deltas.items():
        delta = sft.diffs[name]
        assert torch.equal(delta.indices, dense.reshape(-1).nonzero().flatten()), name  # row-major, ascending
        assert torch.equal(delta.to_dense(), dense), name
    assert sft.diffs["encoder.layer.0.attention.self.key.weight"].nnz == 0
    assert set(sft.full) == set(head)
    for name, tensor in head.items():
        assert torch.equal(sft.full[name], tensor)
    meta = sft.metadata
    assert (meta.kind, meta.task, meta.labels, meta.method) == ("task", "sa", LABELS, "lt-sft")
    assert meta.extra["lt_sft"]["prefix"] == "roberta"
    assert detect_format(directory / LTSFT_FILE) == "lt-sft"  # the file itself is accepted too
    assert_same_sft(sft, import_sft(directory / LTSFT_FILE, {"task": "sa", "labels": LABELS}).sft)


def test_composing_an_imported_ltsft_equals_adding_the_dense_deltas(task_ltsft, tiny_base, base_mlm):
    directory, deltas, head = task_ltsft
    result = import_sft(directory, {"kind": "task", "task": "sa", "labels": LABELS}, base=str(tiny_base))
    assert result.sft.metadata.base_fingerprint == base_fingerprint(base_mlm)
    assert result.sft.metadata.density == pytest.approx(
        sum(int(d.count_nonzero()) for d in deltas.values()) / sum(p.numel() for _, p in maskable_parameters(base_mlm))
    )
    model = compose(str(tiny_base), [result.sft], head="sequence-classification")
    base_params = dict(base_mlm.roberta.named_parameters())
    for name, param in model.roberta.named_parameters():
        expected = base_params[name] + deltas[name] if name in deltas else base_params[name]
        assert torch.equal(param, expected), name
    composed = dict(model.named_parameters())
    for name in (n for n, _ in head_parameters(model)):
        assert torch.equal(composed[name], head[name]), name
    assert model.config.id2label == dict(enumerate(LABELS))


def test_numpy1_scalar_global_is_accepted(task_ltsft, tmp_path):
    """Files written with numpy 1 name the scalar ``numpy.core.multiarray.scalar``."""
    directory, deltas, _ = task_ltsft
    rewritten = tmp_path / "np1"
    rewritten.mkdir()
    with zipfile.ZipFile(directory / LTSFT_FILE) as source, zipfile.ZipFile(rewritten / LTSFT_FILE, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"cnumpy._core.multiarray\nscalar\n" in data
                data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
            target.writestr(info, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(
        rewritten / LTSFT_FILE
    )
    sft = read_ltsft(rewritten).sft
    for name, dense in deltas.items():
        assert torch.equal(sft.diffs[name].to_dense(), dense)


class _RunsCode:
    """Pickles to a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "evil"
    directory.mkdir()
    torch.save({"diffs": {}, "abs": {"classifier.weight": _RunsCode(marker)}}, directory / LTSFT_FILE)
    # the payload is really there: the file calls os.system when unpickled without restrictions
    assert any(
        g.endswith(".system") for g in torch.serialization.get_unsafe_globals_in_checkpoint(directory / LTSFT_FILE)
    )
    with pytest.raises(BadInputError, match="unsafe or unsupported pickle"):
        import_sft(directory, {"kind": "task", "task": "sa"})
    assert not marker.exists()


def test_other_numpy_objects_are_refused(tmp_path):
    """The allowlist is exactly the int64 scalar: a numpy array (``_reconstruct``) is refused."""
    entry = {"size": torch.Size([4]), "index_steps": [1], "values": np.array([0.5])}
    torch.save({"diffs": {"roberta.encoder.x.bias": entry}, "abs": {}}, tmp_path / LTSFT_FILE)
    with pytest.raises(BadInputError, match="unsafe or unsupported pickle"):
        read_ltsft(tmp_path)


@pytest.mark.parametrize(
    ("steps", "values", "message"),
    [
        ([np.int64(3), 0], [1.0, 2.0], "positive"),
        ([np.int64(3), -1], [1.0, 2.0], "positive"),
        ([np.int64(11)], [1.0], "out of range"),
        ([np.int64(1), 2], [1.0], "2 index steps but 1 values"),
        ([np.int64(1), 2.5], [1.0, 2.0], "integers"),
        ([1.0], [1.0], "integers"),
    ],
)
def test_malformed_entries_are_refused(tmp_path, steps, values, message):
    entry = {"size": torch.Size([2, 5]), "index_steps": steps, "values": torch.tensor(values)}
    torch.save({"diffs": {"roberta.encoder.layer.0.output.dense.weight": entry}, "abs": {}}, tmp_path / LTSFT_FILE)
    with pytest.raises(BadInputError, match=message):
        read_ltsft(tmp_path, {"language": "ace"})


def test_not_an_sft_is_refused(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / LTSFT_FILE)
    with pytest.raises(BadInputError, match="not an LT-SFT file"):
        read_ltsft(tmp_path)
    (tmp_path / LTSFT_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BadInputError):
        read_ltsft(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no SFT"):
        detect_format(tmp_path / "empty")
    with pytest.raises(BadInputError, match="does not exist"):
        detect_format(tmp_path / "absent")


def test_prefix_is_detected_from_bert_names_and_mixed_names_are_refused(tmp_path):
    entry = encode_reference(torch.tensor([[0.0, 1.5], [0.0, 0.0], [2.5, 0.0]]))
    torch.save({"diffs": {"bert.encoder.layer.0.output.dense.weight": entry}, "abs": {}}, tmp_path / LTSFT_FILE)
    sft = read_ltsft(tmp_path, {"language": "en"}).sft
    assert list(sft.diffs) == ["encoder.layer.0.output.dense.weight"]
    assert sft.metadata.extra["lt_sft"]["prefix"] == "bert"
    assert sft.metadata.kind == "language"
    assert torch.equal(sft.diffs["encoder.layer.0.output.dense.weight"].indices, torch.tensor([1, 4]))
    torch.save(
        {"diffs": {"bert.encoder.a.weight": entry, "roberta.encoder.a.weight": entry}, "abs": {}},
        tmp_path / LTSFT_FILE,
    )
    with pytest.raises(BadInputError, match="--prefix"):
        read_ltsft(tmp_path)


# ------------------------------------------------------------------ tied MLM decoder
@pytest.fixture(scope="module")
def language_ltsft(tmp_path_factory, base_mlm):
    """A language LT-SFT as the reference writes it under transformers 5 with a tied decoder: the trained
    word embeddings sit densely in 'abs' under lm_head.decoder.weight, with no word-embedding diff."""
    generator = torch.Generator().manual_seed(3)
    params = dict(base_mlm.roberta.named_parameters())
    embeddings = params["embeddings.word_embeddings.weight"].detach()
    trained = embeddings + sparse_random(embeddings.shape, 0.1, generator)
    ffn = sparse_random(params["encoder.layer.1.intermediate.dense.weight"].shape, 0.1, generator)
    attention = sparse_random(params["encoder.layer.0.attention.output.dense.weight"].shape, 0.1, generator)
    head = {name: p.detach() + 0.25 for name, p in head_parameters(base_mlm)}
    payload = {
        "diffs": {
            "roberta.encoder.layer.1.intermediate.dense.weight": encode_reference(ffn),
            "roberta.encoder.layer.0.attention.output.dense.weight": encode_reference(attention),
        },
        "abs": {**head, "lm_head.decoder.weight": trained},
    }
    directory = tmp_path_factory.mktemp("ltsft-lang")
    torch.save(payload, directory / LTSFT_FILE)
    return directory, trained - embeddings, ffn


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_tied_decoder_stays_a_head_tensor_by_default(language_ltsft, tiny_base, with_base):
    """With or without the base, the tied decoder stays a dense MLM-head tensor. (Until issue 12 an import
    with the base turned it into a word-embedding delta, so compositions differed from the reference's
    ``apply(with_abs=False)``; that is now the ``decoder_as_embeddings`` opt-in.)"""
    directory, _, ffn = language_ltsft
    result = import_sft(directory, {"language": "ace"}, base=str(tiny_base) if with_base else None)
    sft = result.sft
    assert sft.metadata.kind == "language"
    assert "embeddings.word_embeddings.weight" not in sft.diffs
    assert torch.equal(
        sft.full["lm_head.decoder.weight"], load_reference_file(directory)["abs"]["lm_head.decoder.weight"]
    )
    assert torch.equal(sft.diffs["encoder.layer.1.intermediate.dense.weight"].to_dense(), ffn)
    assert any("apply(with_abs=False)" in note and "--decoder-as-embeddings" in note for note in result.notes)
    assert (sft.metadata.base_fingerprint is None) is not with_base
    if not with_base:
        assert any("--base" in note for note in result.notes)


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("head", ["sequence-classification", "none", "masked-lm"])
def test_imported_language_ltsft_composes_exactly_as_the_reference_apply(
    language_ltsft, task_ltsft, tiny_base, head, with_base
):
    """Into a classifier (with a task SFT and its head) or a bare encoder, the language SFT's abs — its
    tied decoder holding trained embeddings — is ignored, as by the reference's ``apply(with_abs=False)``;
    into a masked-LM model it is applied, as by ``apply(with_abs=True)``."""
    base = str(tiny_base) if with_base else None
    language = import_sft(language_ltsft[0], {"language": "ace"}, base=base).sft
    model = load_base(str(tiny_base), head, LABELS)
    expected = copy.deepcopy(model)  # the same randomly initialised head or pooler on both sides
    reference_apply(expected, load_reference_file(language_ltsft[0]), with_abs=head == "masked-lm")
    sfts = [language]
    if head == "sequence-classification":
        sfts.append(import_sft(task_ltsft[0], {"task": "sa", "labels": LABELS}, base=base).sft)
        reference_apply(expected, load_reference_file(task_ltsft[0]), with_abs=True)
    assert_same_weights(compose(model, sfts, head=head), expected)


def test_decoder_as_embeddings_is_an_opt_in_that_warns(language_ltsft, tiny_base):
    """On request (and only with the base) the tied decoder becomes the word-embedding delta trained − base,
    so compositions keep the embedding change and differ from the reference, as a note warns."""
    directory, embedding_delta, ffn = language_ltsft
    result = import_sft(directory, {"language": "ace"}, base=str(tiny_base), decoder_as_embeddings=True)
    sft = result.sft
    assert "lm_head.decoder.weight" not in sft.full
    assert torch.equal(sft.diffs["embeddings.word_embeddings.weight"].to_dense(), embedding_delta)
    assert torch.equal(sft.diffs["encoder.layer.1.intermediate.dense.weight"].to_dense(), ffn)
    assert sft.metadata.extra["lt_sft"]["converted"] == ["lm_head.decoder.weight"]
    assert any("differ from composable-sft's apply(with_abs=False)" in note for note in result.notes)
    model = compose(str(tiny_base), [sft], head="none")
    base = AutoModelForMaskedLM.from_pretrained(tiny_base)
    assert torch.equal(
        model.embeddings.word_embeddings.weight, base.roberta.embeddings.word_embeddings.weight + embedding_delta
    )
    without_base = import_sft(directory, {"language": "ace"}, decoder_as_embeddings=True)
    assert "lm_head.decoder.weight" in without_base.sft.full
    assert any("needs the base model (--base)" in note for note in without_base.notes)


def test_redundant_tied_decoder_is_dropped(tmp_path):
    embeddings = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    payload = {
        "diffs": {"roberta.embeddings.word_embeddings.weight": encode_reference(embeddings)},
        "abs": {"lm_head.decoder.weight": torch.ones(2, 3), "lm_head.bias": torch.zeros(2)},
    }
    torch.save(payload, tmp_path / LTSFT_FILE)
    result = read_ltsft(tmp_path, {"language": "ace"})
    assert set(result.sft.full) == {"lm_head.bias"}
    assert result.sft.metadata.extra["lt_sft"]["dropped"] == ["lm_head.decoder.weight"]


def test_import_refuses_a_base_of_other_shapes(tmp_path, tiny_base):
    entry = encode_reference(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.save({"diffs": {"roberta.encoder.layer.0.output.dense.weight": entry}, "abs": {}}, tmp_path / LTSFT_FILE)
    with pytest.raises(BaseMismatchError, match="differs"):
        import_sft(tmp_path, {"language": "ace"}, base=str(tiny_base))


# ------------------------------------------------------------------ export and round trips
@pytest.fixture(scope="module")
def our_sft(base_mlm, tiny_base):
    generator = torch.Generator().manual_seed(11)
    start = {name: p.detach().clone() for name, p in maskable_parameters(base_mlm)}
    end = {name: t + torch.randn(t.shape, generator=generator) for name, t in start.items()}
    masks = {name: torch.rand(t.shape, generator=generator) < 0.05 for name, t in start.items()}
    masks["encoder.layer.0.attention.self.value.bias"] = torch.zeros_like(
        masks["encoder.layer.0.attention.self.value.bias"]
    )
    head = {name: p.detach() * 2 for name, p in head_parameters(base_mlm)}
    metadata = SFTMetadata(
        kind="language",
        language="ace",
        base_model=str(tiny_base),
        base_fingerprint=base_fingerprint(base_mlm),
        method="deftx",
        rank="90var",
        keep=0.05,
        metrics={"val_loss": 2.5},
    )
    return SparseFineTuning.from_state_dicts(start, end, masks, head, metadata)


def assert_same_sft(left: SparseFineTuning, right: SparseFineTuning) -> None:
    assert set(left.diffs) == set(right.diffs)
    for name, delta in left.diffs.items():
        other = right.diffs[name]
        assert delta.shape == other.shape, name
        assert torch.equal(delta.indices, other.indices), name
        assert torch.equal(delta.values, other.values), name
    assert set(left.full) == set(right.full)
    for name, tensor in left.full.items():
        assert torch.equal(tensor, right.full[name]), name


def test_round_trip_ours_to_ltsft_to_ours_is_identical(our_sft, tmp_path):
    out = export_sft(our_sft, tmp_path / "exported", format="lt-sft")  # prefix from the base's config
    assert sorted(p.name for p in out.iterdir()) == sorted([LTSFT_FILE, SIDECAR_NAME, "README.md"])
    back = import_sft(out).sft
    assert_same_sft(our_sft, back)
    assert back.metadata.to_dict() == our_sft.metadata.to_dict()
    # and through our own format again
    saved = export_sft(back, tmp_path / "ours", format="sftkit")
    assert_same_sft(our_sft, SparseFineTuning.load(saved))


def test_exported_file_follows_the_reference_format(our_sft, tmp_path):
    out = export_sft(our_sft, tmp_path / "exported", format="lt-sft", prefix="roberta")
    payload = torch.load(out / LTSFT_FILE, weights_only=True)  # plain ints: loads with no allowlist
    assert set(payload) == {"diffs", "abs"}
    assert set(payload["diffs"]) == {f"roberta.{name}" for name in our_sft.diffs}
    for name, delta in our_sft.diffs.items():
        entry = payload["diffs"][f"roberta.{name}"]
        assert isinstance(entry["size"], torch.Size)
        assert all(isinstance(step, int) for step in entry["index_steps"])
        assert all(step > 0 for step in entry["index_steps"][1:])
        assert torch.equal(decode_reference(entry), delta.to_dense()), name
    assert payload["diffs"]["roberta.encoder.layer.0.attention.self.value.bias"]["index_steps"] == []
    assert set(payload["abs"]) == set(our_sft.full)


def test_bare_ltsft_round_trip_keeps_deltas_and_records_the_prefix(our_sft, tmp_path):
    out = export_sft(our_sft, tmp_path / "exported", format="lt-sft", prefix="roberta")
    (out / SIDECAR_NAME).unlink()
    back = import_sft(out, {"language": "ace"}).sft
    assert_same_sft(our_sft, back)
    assert back.metadata.method == "lt-sft"
    assert back.metadata.extra["lt_sft"]["prefix"] == "roberta"
    again = export_sft(back, tmp_path / "again", format="lt-sft")  # prefix from extra, no base needed
    assert_same_sft(our_sft, import_sft(again).sft)


def test_export_is_atomic_and_refuses_to_overwrite(our_sft, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="already exists"):
        export_sft(our_sft, target, format="lt-sft", prefix="roberta")
    assert (target / "keep.txt").read_text() == "mine"
    unknown = SparseFineTuning(our_sft.diffs, our_sft.full, SFTMetadata(language="ace"))
    with pytest.raises(BadInputError, match="--prefix"):
        export_sft(unknown, tmp_path / "nowhere", format="lt-sft")
    assert not (tmp_path / "nowhere").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_importing_ours_applies_overrides_and_checks_the_base(our_sft, tmp_path, other_base):
    directory = our_sft.save(tmp_path / "sft")
    result = import_sft(directory, {"language": "ban", "metrics": {"note": 1}})
    assert result.sft.metadata.language == "ban"
    assert result.notes == []
    assert_same_sft(our_sft, result.sft)
    with pytest.raises(BaseMismatchError):
        import_sft(directory, base=str(other_base))
    meta = json.loads((directory / "sft_config.json").read_text())
    assert meta["language"] == "ace"  # the source directory is never modified


# ------------------------------------------------------------------ command line


def test_cli_imports_an_ltsft_task_and_exports_it_back(cli, task_ltsft, tiny_base, tmp_path):
    directory, deltas, head = task_ltsft
    result = cli("import", directory, "--task", "sa", "--labels", ",".join(LABELS), "--base", tiny_base, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["kind"], record["task"], record["method"], record["format"]) == ("task", "sa", "lt-sft", "lt-sft")
    assert record["base_fingerprint"].startswith("sha256:")
    assert record["num_entries"] == sum(int(d.count_nonzero()) for d in deltas.values())

    result = cli("export", record["reference"], "--format", "lt-sft", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "out" / LTSFT_FILE, weights_only=True)
    for name, dense in deltas.items():
        assert torch.equal(decode_reference(payload["diffs"][f"roberta.{name}"]), dense), name
    for name, tensor in head.items():
        assert torch.equal(payload["abs"][name], tensor)

    result = cli("export", record["reference"], "--format", "sftkit", "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert SparseFineTuning.load(tmp_path / "ours").metadata.labels == LABELS
    assert "already exists" in one_line_error(cli("export", record["reference"], "-o", tmp_path / "out"))


def test_cli_import_without_base_says_the_fingerprint_is_unknown(cli, language_ltsft):
    directory, _, _ = language_ltsft
    result = cli("import", directory, "--lang", "ace", "--tag", "published")
    assert result.exit_code == 0, result.output
    assert "registered lang:ace@1" in result.stdout
    assert "fingerprint unknown" in result.stderr
    shown = cli("import", directory, "--lang", "ace", "--json")
    record = json.loads(shown.stdout)
    assert record["base_fingerprint"] is None
    assert record["reference"] == "lang:ace@1"  # the same content is stored once
    assert record["tags"] == ["published"]


def test_cli_refuses_a_pickle_that_would_run_code(cli, tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "evil"
    directory.mkdir()
    torch.save({"diffs": {}, "abs": {"classifier.weight": _RunsCode(marker)}}, directory / LTSFT_FILE)
    line = one_line_error(cli("import", directory, "--task", "sa"))
    assert "unsafe or unsupported pickle" in line
    assert not marker.exists()


def test_cli_import_bad_inputs(cli, tmp_path):
    assert "does not exist" in one_line_error(cli("import", tmp_path / "absent", "--lang", "ace"))
    (tmp_path / "empty").mkdir()
    assert "holds no SFT" in one_line_error(cli("import", tmp_path / "empty", "--lang", "ace"))
    assert "--labels" in one_line_error(cli("import", tmp_path / "empty", "--task", "sa", "--labels", "a,,b"))
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    head = {"classifier.out_proj.weight": torch.ones(2, 3)}
    torch.save(
        {"diffs": {"roberta.encoder.x.weight": encode_reference(torch.eye(3))}, "abs": head}, unnamed / LTSFT_FILE
    )
    assert "give --task NAME" in one_line_error(cli("import", unnamed))


def test_cli_import_of_our_format_stores_it_unchanged_or_in_its_own_dtype(cli, our_sft, tmp_path):
    directory = our_sft.save(tmp_path / "half", dtype="float16")
    record = json.loads(cli("import", directory, "--json").stdout)
    stored = Path(record["path"])
    for name in ("sft_config.json", "sft_model.safetensors", "README.md"):
        assert (stored / name).read_bytes() == (directory / name).read_bytes(), name
    renamed = json.loads(cli("import", directory, "--lang", "ban", "--json").stdout)
    assert renamed["reference"] == "lang:ban@1"
    again = SparseFineTuning.load(renamed["path"])
    assert all(delta.values.dtype == torch.float16 for delta in again.diffs.values())
    assert_same_sft(SparseFineTuning.load(directory), again)


def test_cli_import_with_an_unloadable_base_records_its_name_only(cli, language_ltsft, tmp_path):
    directory, _, _ = language_ltsft
    result = cli("import", directory, "--lang", "ace", "--base", tmp_path / "no-such-model", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["base_model"] == str(tmp_path / "no-such-model")
    assert record["base_fingerprint"] is None
    assert any("cannot load base model" in note and "fingerprint is unknown" in note for note in record["notes"])


def test_cli_import_then_compose_equals_the_reference_apply(cli, language_ltsft, task_ltsft, tiny_base, tmp_path):
    """The default import, then ``sftkit compose`` (the streaming export), gives the reference's weights."""
    language, task = load_reference_file(language_ltsft[0]), load_reference_file(task_ltsft[0])
    assert not set(language["diffs"]) & set(task["diffs"])  # so the order of the additions cannot matter
    result = cli("import", language_ltsft[0], "--lang", "ace", "--base", tiny_base)
    assert result.exit_code == 0, result.output
    assert "--decoder-as-embeddings" in result.stderr
    result = cli("import", task_ltsft[0], "--task", "sa", "--labels", ",".join(LABELS), "--base", tiny_base)
    assert result.exit_code == 0, result.output
    result = cli("compose", "--task", "sa", "--lang", "ace", "-o", tmp_path / "model")
    assert result.exit_code == 0, result.output
    expected = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=len(LABELS))
    reference_apply(expected, language, with_abs=False)
    reference_apply(expected, task, with_abs=True)
    assert_same_weights(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model"), expected)


def test_cli_decoder_as_embeddings_converts_with_a_warning(cli, language_ltsft, tiny_base, tmp_path):
    directory, embedding_delta, _ = language_ltsft
    result = cli("import", directory, "--lang", "ace", "--base", tiny_base, "--decoder-as-embeddings")
    assert result.exit_code == 0, result.output
    assert "registered lang:ace@1" in result.stdout
    assert "note:" in result.stderr and "differ from composable-sft's apply(with_abs=False)" in result.stderr
    assert cli("export", "lang:ace@1", "--format", "sftkit", "-o", tmp_path / "ours").exit_code == 0
    sft = SparseFineTuning.load(tmp_path / "ours")
    assert "lm_head.decoder.weight" not in sft.full
    assert torch.equal(sft.diffs["embeddings.word_embeddings.weight"].to_dense(), embedding_delta)
