"""TIES / DARE merges through ``compose``, against an independent dense implementation of the issue's formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from merge_helpers import FORCED, WEIGHTS, random_sfts
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sftkit.compose import compose, compose_to_directory
from sftkit.composition_plan import COMPOSE_RECORD
from sftkit.errors import BadInputError
from sftkit.merging import Draw
from sftkit.params import encoder_of
from sftkit.sft import SparseFineTuning


@pytest.fixture(scope="module")
def sfts(tiny_base) -> list[SparseFineTuning]:
    return random_sfts(tiny_base)


def _reference(
    method: str, sfts: list[SparseFineTuning], weights: list[float], density: float, seed: int, normalize: bool
) -> dict[str, torch.Tensor]:
    """The merged delta of every parameter, dense, straight from the issue's formulas (mergekit's order)."""
    merged = {}
    for name in sfts[0].diffs:
        kept = []
        for position, (sft, weight) in enumerate(zip(sfts, weights, strict=True)):
            delta = sft.diffs[name]
            stored = torch.zeros(delta.numel, dtype=torch.bool)
            stored[delta.indices] = True
            value = weight * delta.to_dense().reshape(-1)
            if method == "ties":
                order = torch.argsort(value.abs(), descending=True, stable=True)
                keep = torch.zeros_like(stored)
                keep[order[: math.floor(density * int(stored.sum()))]] = True
                value = torch.where(keep, value, 0.0)
            elif method.startswith("dare"):
                draws = torch.ones(delta.numel)
                draws[delta.indices] = Draw(seed, position, name).uniform(delta.nnz)
                value = torch.where(stored & (draws < density), value / density, 0.0)
            kept.append(value)
        stack = torch.stack(kept)
        if method in ("ties", "dare-ties"):
            sign = torch.where(sum(kept) >= 0, 1.0, -1.0)  # Σ in SFT order: (0 + δ₁) + δ₂ + δ₃
            agree = stack.sign() == sign
            total = (stack * agree).sum(0)
            if normalize:
                divisor = (torch.tensor(weights)[:, None] * agree).sum(0)
                total = total / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        else:
            total = stack.sum(0)
        merged[name] = total.view(sfts[0].diffs[name].shape)
    return merged


def _encoder_deltas(model, base) -> dict[str, torch.Tensor]:
    theta0 = dict(encoder_of(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)).named_parameters())
    changed = encoder_of(model).named_parameters()
    return {name: p.detach() - theta0[name].detach() for name, p in changed if name in theta0}


@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear"])
@pytest.mark.parametrize("density", [0.3, 0.65, 1.0])
def test_merge_equals_the_dense_formulas(tiny_base, sfts, method, density):
    normalize = None if method == "dare-linear" else True
    model = compose(str(tiny_base), sfts, WEIGHTS, merge=method, density=density, normalize=normalize)
    got = _encoder_deltas(model, tiny_base)
    expected = _reference(method, sfts, WEIGHTS, density, 0, bool(normalize))
    for name, delta in expected.items():
        assert torch.allclose(got[name], delta, atol=2e-6), name
    for name, tensor in sfts[0].full.items():  # the task SFT's head on top, untouched by the merge
        assert torch.equal(model.state_dict()[name], tensor), name
    assert sum(int((d != 0).sum()) for d in expected.values()) > 1000  # not a vacuous comparison


def test_ties_sign_election_and_normalisation_on_known_entries(tiny_base, sfts):
    """All-positive entries become the weighted mean of the wᵢ φᵢ, all-negative ones too; without
    normalisation they are the plain sum; an entry stored by one SFT only keeps φ (w φ / w)."""
    merged = _encoder_deltas(compose(str(tiny_base), sfts, WEIGHTS, merge="ties"), tiny_base)[FORCED].reshape(-1)
    plain = compose(str(tiny_base), sfts, WEIGHTS, merge="ties", normalize=False)
    summed = _encoder_deltas(plain, tiny_base)[FORCED].reshape(-1)
    phis = torch.stack([sft.diffs[FORCED].to_dense().reshape(-1) for sft in sfts])
    weighted = torch.tensor(WEIGHTS)[:, None] * phis
    assert bool((merged[:10] > 0).all()) and bool((merged[10:20] < 0).all())
    assert torch.allclose(merged[:20], weighted[:, :20].sum(0) / sum(WEIGHTS), atol=1e-6)
    assert torch.allclose(summed[:20], weighted[:, :20].sum(0), atol=1e-6)
    assert torch.allclose(merged[20:30], weighted[1:, 20:30].sum(0) / sum(WEIGHTS[1:]), atol=1e-6)
    alone = ((phis != 0).sum(0) == 1).nonzero().flatten()
    assert alone.numel() > 10
    assert torch.allclose(merged[alone], phis[:, alone].sum(0), atol=1e-6)
    conflicting = ((phis > 0).any(0) & (phis < 0).any(0)).nonzero().flatten()
    assert conflicting.numel() > 10  # sign election really had something to decide


def test_dare_keeps_about_d_and_follows_its_seed(tiny_base, sfts):
    def delta(seed: int, density: float = 0.4) -> torch.Tensor:
        model = compose(
            str(tiny_base), sfts[1:2], [0.5], head="none", merge="dare-linear", density=density, merge_seed=seed
        )
        return _encoder_deltas(model, tiny_base)[FORCED]

    stored = sfts[1].diffs[FORCED]
    first = delta(3)
    kept = first.reshape(-1)[stored.indices] != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.05
    # Kept entries are w φ / D; the others are dropped.
    assert torch.allclose(first.reshape(-1)[stored.indices][kept], 0.5 * stored.values[kept] / 0.4, atol=1e-6)
    assert torch.equal(delta(3), first)
    assert not torch.equal(delta(4), first)


def test_dare_at_density_one_is_sum(tiny_base, sfts):
    summed = _encoder_deltas(compose(str(tiny_base), sfts, WEIGHTS), tiny_base)
    dare = _encoder_deltas(compose(str(tiny_base), sfts, WEIGHTS, merge="dare-linear", density=1.0), tiny_base)
    for name, tensor in summed.items():
        assert torch.allclose(dare[name], tensor, atol=1e-6), name


def test_trim_breaks_magnitude_ties_by_index(tiny_base):
    """Half-precision values repeat magnitudes: the trim keeps exactly ⌊D·n⌋, the lower indices first."""
    sft = random_sfts(tiny_base)
    for part in sft:
        for delta in part.diffs.values():
            delta.values = (delta.values * 4).round() / 4  # few distinct magnitudes
    model = compose(str(tiny_base), sft, WEIGHTS, merge="ties", density=0.5)
    got = _encoder_deltas(model, tiny_base)
    for name, delta in _reference("ties", sft, WEIGHTS, 0.5, 0, True).items():
        assert torch.allclose(got[name], delta, atol=2e-6), name


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"merge": "ties", "density": 0.0}, "in (0, 1]"),
        ({"merge": "dare-ties", "density": 1.5}, "in (0, 1]"),
        ({"merge": "ties", "merge_seed": 1}, "--merge-seed only applies to DARE"),
        ({"density": 0.5}, "--density needs a merge method that sparsifies"),
        ({"merge": "dare-linear", "normalize": False}, "normalisation only applies"),
        ({"merge": "breadcrumbs"}, "merge method must be one of sum, ties, dare-linear, dare-ties"),
    ],
)
def test_bad_merge_settings(tiny_base, sfts, settings, message):
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace("]", r"\]")):
        compose(str(tiny_base), sfts, **settings)


def test_sign_election_needs_two_sfts(tiny_base, sfts):
    with pytest.raises(BadInputError, match="needs at least two"):
        compose(str(tiny_base), sfts[:1], merge="ties")


def test_record_and_card_say_how_it_was_merged(tiny_base, sfts, tmp_path):
    out = compose_to_directory(
        str(tiny_base), sfts, tmp_path / "m", WEIGHTS, merge="dare-ties", density=0.6, merge_seed=7, normalize=False
    )
    record = json.loads((out / COMPOSE_RECORD).read_text())
    assert record["merge"] == {"method": "dare-ties", "density": 0.6, "seed": 7, "normalize": False}
    assert [p["weight"] for p in record["sfts"]] == WEIGHTS
    assert "dare-ties merge of the wᵢ φᵢ (density 0.6, seed 7, not normalised)" in (out / "README.md").read_text()
    expected = compose(str(tiny_base), sfts, WEIGHTS, merge="dare-ties", density=0.6, merge_seed=7, normalize=False)
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(written[name], tensor), name
    summed = json.loads((compose_to_directory(str(tiny_base), sfts, tmp_path / "s") / COMPOSE_RECORD).read_text())
    assert summed["merge"] == {"method": "sum", "density": None, "seed": None, "normalize": None}
