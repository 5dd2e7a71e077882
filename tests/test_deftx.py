"""DEFT-X core against plain float64 implementations: SVD denoising, global top-k, rank and k specs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sftkit import deftx
from sftkit.errors import BadInputError
from sftkit.params import is_maskable_name

# --- plain references ---------------------------------------------------------------------------------


def reference_rank(singular_values: torch.Tensor, rank: int | float) -> int:
    if isinstance(rank, int):
        return min(rank, singular_values.numel())
    energies = (singular_values**2).tolist()
    total, running = sum(energies), 0.0
    for r, energy in enumerate(energies, start=1):
        running += energy
        if running >= rank * total:
            return r
    return len(energies)


def reference_denoise(delta: torch.Tensor, rank: int | float, keep: float) -> dict:
    """The paper's recipe in float64 with a full SVD: L = U_r Σ_r V_rᵀ, R = δ − L, S = top |R|, L + S."""
    x = delta.double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    r = reference_rank(s, rank)
    low_rank = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    residual = x - low_rank
    kept = round(keep * x.numel())
    order = torch.argsort(residual.abs().flatten(), descending=True, stable=True)[:kept]
    sparse = torch.zeros(x.numel(), dtype=torch.float64)
    sparse[order] = residual.flatten()[order]
    threshold = float(residual.abs().flatten()[order[-1]]) if kept else math.inf
    energy = float((s[:r] ** 2).sum() / (s**2).sum())
    return {"out": low_rank + sparse.view_as(x), "rank": r, "energy": energy, "residual": residual, "t": threshold}


def assert_close_to_reference(out: torch.Tensor, delta: torch.Tensor, ref: dict, tolerance: float = 1e-4) -> None:
    """Within ``tolerance`` (relative) of the float64 answer, except that residual entries tied with the
    threshold (to within the tolerance) may be kept by one side and not the other."""
    diff = out.double() - ref["out"]
    size = float(delta.double().abs().max())
    swapped = diff.abs() > tolerance * size
    near_threshold = (ref["residual"].abs() - ref["t"]).abs() <= tolerance * size
    assert bool((~swapped | near_threshold).all()), "an entry far from the threshold differs"
    diff[swapped] = 0
    assert float(diff.norm()) <= tolerance * float(ref["out"].norm())


def topk_masks(deltas: dict[str, torch.Tensor], k: int, stable: bool = False) -> dict[str, torch.Tensor]:
    """The obvious implementation: concatenate |δ|, top-k (or a stable descending sort, for ties)."""
    flat = torch.cat([delta.double().abs().flatten() for delta in deltas.values()])
    chosen = torch.argsort(flat, descending=True, stable=True)[:k] if stable else torch.topk(flat, k).indices
    selected = torch.zeros(flat.numel(), dtype=torch.bool)
    selected[chosen] = True
    out, start = {}, 0
    for name, delta in deltas.items():
        out[name] = selected[start : start + delta.numel()].view(delta.shape)
        start += delta.numel()
    return out


def lt_sft_masks(deltas: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """LT-SFT's reference selection: every |δ| into one list, np.partition, threshold, |δ| ≥ threshold."""
    diffs: list[float] = []
    for delta in deltas.values():
        diffs.extend(delta.abs().flatten().tolist())
    threshold = np.partition(diffs, len(diffs) - k)[len(diffs) - k]
    return {name: delta.abs() >= threshold for name, delta in deltas.items()}


def assert_same_masks(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(expected)
    for name in expected:
        assert ours[name].dtype == torch.bool and ours[name].shape == expected[name].shape
        assert torch.equal(ours[name], expected[name]), name


def low_rank_plus_noise(m: int, n: int, seed: int, rank: int = 4, signal: float = 0.6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    structure = torch.randn(m, rank, generator=generator) @ torch.randn(rank, n, generator=generator)
    noise = torch.randn(m, n, generator=generator)
    mixed = structure * (signal / structure.norm()) + noise * ((1 - signal) / noise.norm())
    return (mixed * 1e-2).float()


def ill_conditioned(m: int, n: int, seed: int, condition: float = 1e6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    side = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, side, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, side, generator=generator, dtype=torch.float64))
    singular_values = torch.logspace(0, -math.log10(condition), side, dtype=torch.float64)
    return ((u * singular_values) @ v.T).float()


# --- parse_rank / parse_k -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("100", 100), ("1", 1), (" 16 ", 16), ("90var", 0.9), ("92.5VAR", 0.925), ("100var", 1.0), ("none", None)],
)
def test_parse_rank_accepts_the_three_forms(spec, expected):
    assert deftx.parse_rank(spec) == expected


@pytest.mark.parametrize("spec", ["abc", "", "-3", "0", "0var", "150var", "1.5", "var", "90 var", "nonee"])
def test_parse_rank_rejects_bad_specs_listing_the_accepted_forms(spec):
    with pytest.raises(ValueError, match=r"invalid rank .*90var.*none") as info:
        deftx.parse_rank(spec)
    assert isinstance(info.value, BadInputError)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("7.6M", 7_600_000),
        ("14200000", 14_200_000),
        ("14,200,000", 14_200_000),
        ("500k", 500_000),
        ("1e6", 1_000_000),
        ("0.028", 0.028),
        ("2.8%", 0.028),
    ],
)
def test_parse_k(spec, expected):
    value = deftx.parse_k(spec)
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize("spec", ["", "abc", "0", "-5", "1.5", "0%", "100%", "7.65432109M", "nan", "inf", "M"])
def test_parse_k_rejects_bad_specs(spec):
    with pytest.raises(BadInputError, match="invalid k"):
        deftx.parse_k(spec)


# --- denoise ---------------------------------------------------------------------------------------------

SHAPES = {"tall": (60, 25), "wide": (20, 70), "square": (40, 40)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rank", [1, 5, 1000, 0.5, 0.9, 1.0])
def test_denoise_matches_float64_svd(shape, rank):
    delta = low_rank_plus_noise(*SHAPES[shape], seed=sum(SHAPES[shape]) + round(rank * 100))
    ref = reference_denoise(delta, rank, keep=0.05)
    out = deftx.denoise(delta, rank)
    assert out.dtype == delta.dtype and out.shape == delta.shape
    assert_close_to_reference(out, delta, ref)
    _, report = deftx.denoise_all({"w": delta}, rank, maskable=lambda _: True)
    assert report[0]["rank"] == ref["rank"]
    assert report[0]["energy_kept"] == pytest.approx(ref["energy"], rel=1e-6)
    assert report[0]["residual_kept"] == round(0.05 * delta.numel())


@pytest.mark.parametrize("rank", [3, 100, 0.9, 0.99])
def test_denoise_stays_accurate_on_ill_conditioned_and_clustered_spectra(rank):
    """Where a float32 Gram matrix fails (a rank cut inside the noise under a strong low-rank part: L 3e-4
    off), the float64-accumulated Gram eigendecomposition stays within 1e-4 of a float64 SVD."""
    for delta in (ill_conditioned(300, 120, seed=1), low_rank_plus_noise(600, 250, seed=2, rank=8, signal=0.97)):
        assert_close_to_reference(deftx.denoise(delta, rank), delta, reference_denoise(delta, rank, keep=0.05))


def test_denoise_on_a_rank_deficient_and_a_zero_matrix():
    delta = (torch.randn(50, 3) @ torch.randn(3, 40)).float()
    assert_close_to_reference(deftx.denoise(delta, 0.9), delta, reference_denoise(delta, 0.9, keep=0.05))
    _, report = deftx.denoise_all({"w": delta}, 0.9, maskable=lambda _: True)
    assert report[0]["rank"] <= 3
    assert_close_to_reference(deftx.denoise(delta, 1.0), delta, reference_denoise(delta, 1.0, keep=0.05))
    zeros = torch.zeros(30, 20)
    assert torch.equal(deftx.denoise(zeros, 0.9), zeros)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 0.9])
def test_denoise_half_precision_inputs_compute_in_float32(dtype, rank):
    delta = low_rank_plus_noise(48, 32, seed=3).to(dtype)
    out = deftx.denoise(delta, rank)
    assert out.dtype == dtype
    ref = reference_denoise(delta.float(), rank, keep=0.05)
    ref["out"] = ref["out"].to(dtype).double()  # the answer, rounded to the input's precision
    assert_close_to_reference(out, delta, ref, tolerance=torch.finfo(dtype).eps)


def test_denoise_keep_extremes():
    delta = low_rank_plus_noise(30, 20, seed=4)
    assert torch.equal(deftx.denoise(delta, 2, keep=1.0), delta)  # all residual kept: δ itself
    ref = reference_denoise(delta, 2, keep=0.0)  # nothing kept: the low-rank part alone
    assert_close_to_reference(deftx.denoise(delta, 2, keep=0.0), delta, ref)


def test_denoise_returns_copies_for_vectors_and_rank_none():
    bias, matrix = torch.randn(10), torch.randn(6, 4)
    for delta, rank in ((bias, 0.9), (matrix, None), (matrix, "none")):
        out = deftx.denoise(delta, rank)
        assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def test_denoise_does_not_modify_its_input():
    delta = low_rank_plus_noise(40, 30, seed=5)
    before = delta.clone()
    deftx.denoise(delta, 0.9)
    assert torch.equal(delta, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "invalid rank"),
        ({"rank": -2}, "invalid rank"),
        ({"rank": 0.0}, "invalid rank"),
        ({"rank": 1.5}, "invalid rank"),
        ({"rank": True}, "invalid rank"),
        ({"rank": "150var"}, "invalid rank"),
        ({"rank": 4, "keep": 1.5}, "invalid keep"),
        ({"rank": 4, "keep": -0.1}, "invalid keep"),
    ],
)
def test_denoise_rejects_bad_arguments(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        deftx.denoise(torch.randn(5, 4), **kwargs)


def test_denoise_rejects_non_float_and_higher_dimensional_tensors():
    with pytest.raises(BadInputError, match="floating-point"):
        deftx.denoise(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(BadInputError, match="1-D or 2-D"):
        deftx.denoise(torch.randn(2, 3, 4), 2)


# --- denoise_all -------------------------------------------------------------------------------------


def encoder_deltas(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "embeddings.word_embeddings.weight": (90, 16),
        "embeddings.LayerNorm.weight": (16,),
        "encoder.layer.0.attention.self.query.weight": (16, 16),
        "encoder.layer.0.attention.self.query.bias": (16,),
        "encoder.layer.0.intermediate.dense.weight": (64, 16),
        "encoder.layer.0.output.dense.weight": (16, 64),
        "pooler.dense.weight": (16, 16),
    }
    return {name: torch.randn(shape, generator=generator) * 1e-3 for name, shape in shapes.items()}


def test_denoise_all_denoises_maskable_matrices_and_passes_the_rest_through():
    deltas = encoder_deltas()
    denoised, report = deftx.denoise_all(deltas, "90var", keep=0.1)
    assert list(denoised) == list(deltas)
    untouched = {"embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.bias", "pooler.dense.weight"}
    for name in untouched:
        assert denoised[name] is deltas[name]
    assert [entry["name"] for entry in report] == [name for name in deltas if name not in untouched]
    for entry in report:
        ref = reference_denoise(deltas[entry["name"]], 0.9, keep=0.1)
        assert_close_to_reference(denoised[entry["name"]], deltas[entry["name"]], ref)
        assert entry["rank"] == ref["rank"] and entry["shape"] == list(deltas[entry["name"]].shape)
        assert entry["max_rank"] == min(entry["shape"]) and entry["seconds"] >= 0
    assert json.loads(json.dumps(report)) == report  # stored in SFT metadata as it is


def test_denoise_all_with_rank_none_reports_nothing_and_changes_nothing():
    deltas = encoder_deltas()
    denoised, report = deftx.denoise_all(deltas, None)
    assert report == [] and all(denoised[name] is deltas[name] for name in deltas)


def test_rank_none_pipeline_equals_lt_sft_magnitude_selection():
    maskable = {name: delta for name, delta in encoder_deltas(seed=7).items() if is_maskable_name(name)}
    denoised, _ = deftx.denoise_all(maskable, deftx.parse_rank("none"))
    assert_same_masks(deftx.select(denoised, 300), lt_sft_masks(maskable, 300))


def test_denoised_pipeline_selects_the_top_k_of_the_denoised_deltas():
    maskable = {name: delta for name, delta in encoder_deltas(seed=8).items() if is_maskable_name(name)}
    denoised, _ = deftx.denoise_all(maskable, 4)
    total = sum(delta.numel() for delta in denoised.values())
    assert_same_masks(deftx.select(denoised, 0.05), topk_masks(denoised, round(0.05 * total)))


# --- select --------------------------------------------------------------------------------------------


def random_deltas(seed: int, shapes, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(shape, generator=generator).to(dtype) for i, shape in enumerate(shapes)}


@pytest.mark.parametrize(("k", "count"), [(1, 1), (7, 7), (500, 500), (3050, 3050), (0.03, 92), (0.5, 1525)])
def test_select_equals_topk_over_the_concatenation(k, count):
    deltas = random_deltas(0, [(30, 40), (50,), (9, 200)])  # 3050 entries
    masks = deftx.select(deltas, k)
    assert_same_masks(masks, topk_masks(deltas, count))
    assert sum(int(mask.sum()) for mask in masks.values()) == count


@pytest.mark.parametrize("k", [1, 40, 333, 1000, 1999, 2000])
def test_select_breaks_ties_by_parameter_order_then_flat_index(k):
    generator = torch.Generator().manual_seed(1)
    deltas = {
        "a": torch.randint(-3, 4, (20, 30), generator=generator).float(),
        "b": torch.randint(-3, 4, (400,), generator=generator).half(),
        "c": torch.randint(-3, 4, (40, 25), generator=generator).to(torch.bfloat16),
    }
    masks = deftx.select(deltas, k)
    assert sum(int(mask.sum()) for mask in masks.values()) == k
    assert_same_masks(masks, topk_masks(deltas, k, stable=True))


def test_select_among_all_equal_values_takes_the_first_entries():
    masks = deftx.select({"a": torch.zeros(5, 4), "b": torch.zeros(7)}, 22)
    assert masks["a"].all() and masks["b"][:2].all() and not masks["b"][2:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_on_many_chunks_uses_the_sampled_bracket_and_stays_exact(monkeypatch, dtype):
    """Small chunk and sample sizes so that a test-sized input takes the fast path over many chunks."""
    monkeypatch.setattr(deftx, "_CHUNK", 1000)
    monkeypatch.setattr(deftx, "_SAMPLE", 512)
    deltas = random_deltas(2, [(100, 60), (3000,), (70, 80), (500, 9)], dtype)
    bracketed = []
    original = deftx._bracketed_select
    monkeypatch.setattr(deftx, "_bracketed_select", lambda *a: bracketed.append(original(*a)) or bracketed[-1])
    for k in (5, 600, 7000):
        assert_same_masks(deftx.select(deltas, k), topk_masks(deltas, k))
    assert len(bracketed) == 3 and all(masks is not None for masks in bracketed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_is_exact_when_the_bracket_misses(monkeypatch, dtype):
    monkeypatch.setattr(deftx, "_CHUNK", 700)
    deltas = random_deltas(3, [(60, 50), (2500,)], dtype)
    tensors, names = list(deltas.values()), list(deltas)
    keys = (
        torch.cat([t.abs().flatten() for t in tensors])
        .to(dtype)
        .view(torch.int64 if dtype == torch.float64 else torch.int32)
    )
    wrong = (int(keys.max()) - 10, int(keys.max()), 10_000)  # a bracket above the k-th largest
    assert deftx._bracketed_select(tensors, names, 100, dtype == torch.float64, *wrong) is None
    for k in (1, 100, 2345, 5500):
        masks = deftx._radix_select(tensors, names, k, dtype == torch.float64)
        assert_same_masks(dict(zip(names, masks, strict=True)), topk_masks(deltas, k))


def test_select_with_crowded_ties_stays_exact(monkeypatch):
    """Half the entries are exactly zero and k reaches into them: the bracket is crowded with ties."""
    monkeypatch.setattr(deftx, "_CHUNK", 1000)
    monkeypatch.setattr(deftx, "_SAMPLE", 512)
    deltas = random_deltas(4, [(100, 50), (5000,)])
    deltas["p0"][::2] = 0
    deltas["p1"][2500:] = 0
    k = 5000 + 10
    masks = deftx.select(deltas, k)
    assert_same_masks(masks, topk_masks(deltas, k, stable=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("big", [False, True])
def test_select_rejects_nan_and_infinity(monkeypatch, bad, big):
    if big:
        monkeypatch.setattr(deftx, "_SAMPLE", 256)
    deltas = random_deltas(5, [(60, 50), (40,)])
    deltas["p1"][7] = bad
    with pytest.raises(BadInputError, match="p1 contains NaN or infinite"):
        deftx.select(deltas, 10)


@pytest.mark.parametrize(
    ("k", "message"),
    [
        (0, "positive"),
        (-3, "positive"),
        (131, "larger than the number of maskable entries"),
        (0.0, r"in \(0, 1\)"),
        (1.0, r"in \(0, 1\)"),
        (1.5, r"in \(0, 1\)"),
        (0.001, "selects no entry"),
        (True, "invalid k"),
        ("10", "invalid k"),
    ],
)
def test_select_rejects_bad_k(k, message):
    with pytest.raises(BadInputError, match=message):
        deftx.select({"a": torch.randn(10, 13)}, k)


def test_select_rejects_empty_and_non_float_inputs():
    with pytest.raises(BadInputError, match="no maskable entries"):
        deftx.select({}, 1)
    with pytest.raises(BadInputError, match="floating-point"):
        deftx.select({"a": torch.ones(3, dtype=torch.int32)}, 1)


def test_denoise_all_gives_the_same_result_with_concurrent_small_matrices(monkeypatch):
    """The thread pool for small matrices changes the schedule, never the numbers."""
    generator = torch.Generator().manual_seed(7)
    deltas = {
        f"encoder.layer.{i}.attention.self.query.weight": torch.randn(48, 40, generator=generator) for i in range(6)
    }
    deltas["embeddings.word_embeddings.weight"] = torch.randn(300, 40, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        concurrent, concurrent_report = deftx.denoise_all(deltas, 0.9)
        monkeypatch.setattr(deftx, "_PARALLEL_BELOW", 0)  # everything sequential
        sequential, sequential_report = deftx.denoise_all(deltas, 0.9)
    finally:
        torch.set_num_threads(threads)
    assert list(concurrent) == list(deltas)
    assert [entry["name"] for entry in concurrent_report] == list(deltas)
    for name in deltas:
        assert torch.equal(concurrent[name], sequential[name]), name
    assert [e["rank"] for e in concurrent_report] == [e["rank"] for e in sequential_report]


@pytest.mark.parametrize(("shape", "live_axis"), [((400, 24), 0), ((24, 400), 1), ((300, 40), 0)])
@pytest.mark.parametrize("rank", [0.9, 5, 100])
def test_all_zero_lines_are_skipped_without_changing_the_result(shape, live_axis, rank):
    """An embedding δ with most rows zero (tokens the data never showed) is denoised exactly as a whole."""
    generator = torch.Generator().manual_seed(11)
    delta = low_rank_plus_noise(*shape, seed=11)
    lines = shape[live_axis]
    dead = torch.rand(lines, generator=generator) < 0.8
    if live_axis == 0:
        delta[dead] = 0
    else:
        delta[:, dead] = 0
    out = deftx.denoise(delta, rank, keep=0.05)
    assert_close_to_reference(out, delta, reference_denoise(delta, rank, 0.05))
    assert bool((out[dead] if live_axis == 0 else out[:, dead]).eq(0).all())
    _, report = deftx.denoise_all({"embeddings.word_embeddings.weight": delta}, rank)
    assert report[0]["shape"] == list(shape) and report[0]["max_rank"] == min(shape)
    assert report[0]["rank"] == reference_denoise(delta, rank, 0.05)["rank"]


def test_an_all_zero_matrix_denoises_to_zero():
    out, report = deftx.denoise_all({"encoder.layer.0.output.dense.weight": torch.zeros(30, 20)}, 0.9)
    assert bool(out["encoder.layer.0.output.dense.weight"].eq(0).all())
    assert report[0]["rank"] == 0


def test_blocked_float32_gram_meets_the_bound_on_a_tall_hard_case():
    """20 000 × 768 with a rank-8 part holding 95 % of the energy, cut at rank 100 (inside the noise):
    float32 products summed over all rows put L 1.3e-4 off a float64 SVD; row blocks summed in
    float64 keep it near 1e-5 (measured: 1.2e-5 with 256-row blocks, 1.7e-5 with 1024)."""
    delta = low_rank_plus_noise(20000, 768, seed=6, rank=8, signal=0.95)
    low_rank = reference_denoise(delta, 100, keep=0.0)["out"]
    out = deftx.denoise(delta, 100, keep=0.0).double()
    assert float((out - low_rank).norm() / low_rank.norm()) <= 1e-4
