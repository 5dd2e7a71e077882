"""DEFT-X: denoise a full fine-tuning's δ with a truncated SVD, then choose the global top-k mask.

The method (DEFT-X paper, §3; on top of LT-SFT, Ansell et al. 2022):

1. For every maskable 2-D δ (embeddings included): SVD δ = UΣVᵀ, rank r fixed or the smallest r with
   Σ_{i≤r} σᵢ² ≥ p·Σσᵢ² ("90var" ⇒ p = 0.9); L = U_r Σ_r V_rᵀ; R = δ − L; S = the ``keep`` fraction of R's
   entries with the largest |R|; δ ← L + S. 1-D parameters are not denoised; rank "none" is plain LT-SFT.
2. Mask: the k entries with the largest |δ| over all maskable parameters together, one global threshold.

How it is computed, and why:

- Every singular value is needed for a variance fraction, so truncated/randomized solvers do not apply.
  We eigendecompose the Gram matrix of the short side (768 × 768 for every XLM-R matrix, also the
  250 002 × 768 embedding) instead of running an SVD of the matrix. The Gram matrix squares the condition
  number, so it is accumulated and decomposed in float64, from float32 products of 1024-row blocks (each
  block's sum is accurate to ~1e-6; only the sum over blocks needs float64 — 1.3× faster than float64
  products, at BLAS float32 speed). Measured against a float64 SVD on the hard cases (a rank cut inside the
  noise under a strong low-rank part, ill-conditioned spectra, 3072/20 000 × 768): L is at most 1.7e-5 off,
  where a plain float32 Gram matrix is 1.3e-4 off (over the 1e-4 bound). Fixed ranks take the same exact path
  (no randomized solver).
- L + S = δ − R', with R' = R zeroed at the kept entries: one big buffer holds R, then the result.
- Matrices below 16 M entries are denoised concurrently (one per intra-op thread), one thread each; big ones
  (embeddings) use every thread. LAPACK's float64 eigendecomposition parallelises poorly internally, so
  this overlaps it instead; each matrix's arithmetic is unchanged (tested equal to the sequential run).
- Top-k is exact without sorting or concatenating anything: a random sample brackets the k-th largest |x|,
  one pass selects everything above the bracket and collects the few entries inside it, where the exact
  threshold is found. Should the sample mislead (or ties crowd the bracket), a radix select on the bit
  patterns of |x| (for non-negative IEEE floats, integer order is value order) takes over. Memory stays
  at the masks plus chunk-sized buffers. Ties at the threshold go to the earliest entries: by the order
  of the tensors, then by row-major flat index — the same as a stable descending sort of the
  concatenation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from sftkit.errors import BadInputError
from sftkit.params import is_maskable_name

RANK_FORMS = 'a positive integer (fixed rank, e.g. "100"), a variance percentage in (0, 100] ("90var") or "none"'
K_FORMS = 'a count ("7600000", "7.6M", "500k"), a fraction in (0, 1) ("0.028") or a percentage ("2.8%")'

_CHUNK = 1 << 22  # entries per chunk when scanning tensors: bounds the scratch memory at a few tens of MB
_GRAM_ROWS = 1024  # rows per float32 product added into the float64 Gram matrix: its error stays ~1e-6
_GRAM_PARTS = 3  # column blocks of the Gram matrix; the ones on and above the diagonal are computed
_PARALLEL_BELOW = 1 << 24  # matrices smaller than this are denoised concurrently, one thread each
_COMPACT_BELOW = 0.75  # drop all-zero lines of the long side when fewer than this share of lines is live
_DIGIT_BITS = 16
_SAMPLE = 1 << 19  # keys sampled to bracket the k-th largest one
_K_SCALES = {"k": 10**3, "m": 10**6, "b": 10**9}


def parse_rank(spec: str) -> int | float | None:
    """``"100"`` → 100 (fixed rank), ``"90var"`` → 0.9 (variance fraction), ``"none"`` → None (LT-SFT)."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "none":
        return None
    if re.fullmatch(r"[0-9]+", text) and int(text) >= 1:
        return int(text)
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)var", text)
    if match and 0 < float(match[1]) <= 100:
        return float(match[1]) / 100
    raise BadInputError(f"invalid rank {spec!r}: expected {RANK_FORMS}")


def parse_k(spec: str) -> int | float:
    """``"7.6M"`` / ``"14200000"`` → a count (int); ``"0.028"`` / ``"2.8%"`` → a fraction (float)."""
    text = spec.strip().lower().replace("_", "").replace(",", "") if isinstance(spec, str) else ""
    scale = _K_SCALES.get(text[-1:], 1) if text else 1
    percent = text.endswith("%")
    number = text[:-1] if percent or scale != 1 else text
    try:
        value = Decimal(number)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite():
        raise BadInputError(f"invalid k {spec!r}: expected {K_FORMS}")
    if percent:
        if 0 < value < 100:
            return float(value / 100)
        raise BadInputError(f"invalid k {spec!r}: a percentage must be in (0, 100)")
    count = value * scale
    if count >= 1 and count == count.to_integral_value():
        return int(count)
    if scale == 1 and 0 < value < 1:
        return float(value)
    raise BadInputError(f"invalid k {spec!r}: expected {K_FORMS}")


def denoise(delta: Tensor, rank: int | float | str | None, keep: float = 0.05) -> Tensor:
    """L + S for a 2-D δ (see the module docstring), in δ's dtype; 1-D δ or ``rank=None``: a copy of δ.

    ``rank``: an int (clamped to min(m, n)), a variance fraction in (0, 1], None, or a spec string.
    """
    rank = _checked_rank(rank)
    _check_keep(keep)
    _check_floating("delta", delta)
    if delta.ndim not in (1, 2):
        raise BadInputError(f"denoise expects a 1-D or 2-D tensor, got shape {tuple(delta.shape)}")
    if delta.ndim == 1 or rank is None:
        return delta.detach().clone()
    return _denoise_matrix(delta, rank, keep)[0]


def denoise_all(
    deltas: Mapping[str, Tensor],
    rank: int | float | str | None,
    keep: float = 0.05,
    maskable: Callable[[str], bool] = is_maskable_name,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Denoise every maskable 2-D δ; pass the others through unchanged (the same tensor objects).

    Returns the denoised mapping (same keys, same order) and one JSON-ready report entry per denoised
    matrix — name, shape, chosen rank, max rank, energy kept by L (Σ_{i≤r} σᵢ² / Σσᵢ²), residual entries
    kept, seconds — because rank choice needs tuning and users ask which rank each matrix got.
    ``rank=None`` denoises nothing (plain LT-SFT) and reports nothing.
    """
    rank = _checked_rank(rank)
    _check_keep(keep)
    chosen = [n for n, d in deltas.items() if rank is not None and d.ndim == 2 and maskable(n)]
    for name in chosen:
        _check_floating(name, deltas[name])

    def one(name: str) -> tuple[Tensor, dict[str, Any]]:
        started = time.perf_counter()
        result, entry = _denoise_matrix(deltas[name], rank, keep)
        return result, {"name": name, **entry, "seconds": round(time.perf_counter() - started, 4)}

    # Big matrices (the embeddings) use every intra-op thread; the many small ones run side by side, one
    # thread each: their float64 eigendecompositions parallelise poorly inside LAPACK (measured ~2x).
    small = [name for name in chosen if deltas[name].numel() < _PARALLEL_BELOW]
    done = {name: one(name) for name in chosen if name not in small}
    threads = torch.get_num_threads()
    if threads > 1 and len(small) > 1:
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                done.update(zip(small, pool.map(one, small), strict=True))
        finally:
            torch.set_num_threads(threads)
    else:
        done.update((name, one(name)) for name in small)
    denoised = {name: done[name][0] if name in done else delta for name, delta in deltas.items()}
    return denoised, [done[name][1] for name in chosen]


def select(deltas: Mapping[str, Tensor], k: int | float) -> dict[str, Tensor]:
    """Boolean masks of the k entries with the largest |δ| over all tensors together (exactly k).

    ``k``: a count, or a float in (0, 1) for that fraction of all entries (rounded). Ties at the threshold
    go to the earliest entries — in the mapping's order, then by row-major flat index. Pass only the
    maskable parameters (``sftkit.params``): every entry given here competes for the k places.
    """
    names = list(deltas)
    tensors = [deltas[name] for name in names]
    for name, tensor in zip(names, tensors, strict=True):
        _check_floating(name, tensor)
    count = _entry_count(k, sum(tensor.numel() for tensor in tensors))
    return dict(zip(names, _top_k_masks(tensors, count, names), strict=True))


# --- validation -----------------------------------------------------------------------------------


def _checked_rank(rank: int | float | str | None) -> int | float | None:
    if isinstance(rank, str):
        return parse_rank(rank)
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int | float):
        raise BadInputError(f"invalid rank {rank!r}: expected {RANK_FORMS}")
    if isinstance(rank, int) and rank >= 1:
        return rank
    if isinstance(rank, float) and 0 < rank <= 1:
        return rank
    raise BadInputError(f"invalid rank {rank!r}: an int must be ≥ 1, a variance fraction in (0, 1]")


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 <= keep <= 1:
        raise BadInputError(f"invalid keep {keep!r}: the kept fraction of the residual must be in [0, 1]")


def _check_floating(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise BadInputError(f"δ of {name} has dtype {tensor.dtype}; expected a floating-point tensor")


def _entry_count(k: int | float, total: int) -> int:
    """k as a number of entries, checked against the ``total`` entries that compete."""
    if total == 0:
        raise BadInputError("no maskable entries to select from")
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise BadInputError(f"invalid k {k!r}: expected {K_FORMS}")
    if isinstance(k, float):
        if not 0 < k < 1:
            raise BadInputError(f"invalid k {k!r}: a fraction must be in (0, 1); use an int for a count")
        count = round(k * total)
        if count == 0:
            raise BadInputError(f"k = {k} of {total:,} maskable entries selects no entry")
        return count
    if k <= 0:
        raise BadInputError(f"invalid k {k}: must be a positive number of entries")
    if k > total:
        raise BadInputError(f"k = {k:,} is larger than the number of maskable entries ({total:,})")
    return k


# --- denoising ------------------------------------------------------------------------------------


@torch.no_grad()
def _denoise_matrix(delta: Tensor, rank: int | float, keep: float) -> tuple[Tensor, dict[str, Any]]:
    """L + S of one matrix and its report entry (everything but name and time).

    Lines of the long side that are entirely zero (embedding rows of tokens the data never showed: most
    of a language SFT's 250 002) add nothing to the Gram matrix, project to zero and leave a zero residual,
    so they are dropped before the decomposition and restored as zeros: the same L + S, much sooner.
    """
    x = delta.detach().to(torch.float32).contiguous()
    kept = round(keep * x.numel())
    lines = x if x.shape[0] >= x.shape[1] else x.T  # long side first
    # Σ|x| per line is 0 exactly when the line is (NaN and ∞ count as live); one pass without a |x| copy,
    # ~3x faster than a min/max reduction over the 768 MB embedding δ.
    live = torch.linalg.vector_norm(lines, ord=1, dim=1) != 0
    count = int(live.sum())
    if count > _COMPACT_BELOW * lines.shape[0]:
        denoised, spectrum = _denoise_dense(x, rank, kept)
    elif count == 0:
        denoised, spectrum = x.clone(), {"rank": 0, "energy_kept": 1.0}
    else:
        compact, spectrum = _denoise_dense(lines[live], rank, min(kept, count * lines.shape[1]))
        full = torch.zeros_like(lines)
        full[live] = compact
        denoised = full if lines is x else full.T
    entry = {"shape": list(x.shape), "rank": spectrum["rank"], "max_rank": min(x.shape)}
    entry |= {"energy_kept": spectrum["energy_kept"], "residual_kept": kept}
    return denoised.to(delta.dtype), entry


def _denoise_dense(x: Tensor, rank: int | float, kept: int) -> tuple[Tensor, dict[str, Any]]:
    tall = x.shape[0] >= x.shape[1]
    energies, vectors = _gram_spectrum(x)
    r = _chosen_rank(energies, rank)
    # R = δ − L, projecting on whichever of the kept / dropped subspaces is smaller (half the matmul at worst).
    if r <= energies.numel() - r:
        residual = _project(x, vectors[:, :r].to(torch.float32), tall)
        torch.sub(x, residual, out=residual)
    else:
        residual = _project(x, vectors[:, r:].to(torch.float32), tall)
    if kept:
        residual.masked_fill_(_top_k_masks([residual], kept, ["residual"])[0], 0)
    denoised = torch.sub(x, residual, out=residual)  # L + S = δ − (R outside the kept entries)
    total = float(energies.sum())
    return denoised, {"rank": r, "energy_kept": float(energies[:r].sum()) / total if total > 0 else 1.0}


def _gram_spectrum(x: Tensor) -> tuple[Tensor, Tensor]:
    """σ² in descending order and the matching singular vectors of x's short side, both float64.

    From the eigendecomposition of the float64 Gram matrix of the short side, accumulated from float32
    products of row blocks (see the module docstring), so no float64 copy of a big matrix is ever made.
    The Gram matrix is symmetric: only the blocks on and above the diagonal of a 3 × 3 split of its
    columns are multiplied (2/3 of a full product). All in torch: mixing numpy's BLAS threads with
    torch's in one process made every following torch call slower (measured ~1.6x).
    """
    tall_view = x if x.shape[0] >= x.shape[1] else x.T
    side = tall_view.shape[1]
    edges = [side * part // _GRAM_PARTS for part in range(_GRAM_PARTS + 1)]
    spans = [(start, end) for start, end in pairwise(edges) if end > start]
    gram = torch.zeros(side, side, dtype=torch.float64)
    for block in tall_view.split(_GRAM_ROWS):
        for i, (top, bottom) in enumerate(spans):
            for left, right in spans[i:]:
                gram[top:bottom, left:right] += (block[:, top:bottom].T @ block[:, left:right]).double()
    gram = torch.triu(gram) + torch.triu(gram, diagonal=1).T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


def _chosen_rank(energies: Tensor, rank: int | float) -> int:
    """A fixed rank clamped to the maximum, or the smallest r with Σ_{i≤r} σᵢ² ≥ p·Σσᵢ²."""
    if isinstance(rank, int):
        return min(rank, energies.numel())
    cumulative = torch.cumsum(energies, 0)
    if cumulative[-1] <= 0:
        return 0
    return min(int(torch.searchsorted(cumulative, rank * cumulative[-1])) + 1, energies.numel())


def _project(x: Tensor, basis: Tensor, tall: bool) -> Tensor:
    """x projected on span(basis), a subspace of its short side: x B Bᵀ (tall) or B Bᵀ x (wide)."""
    return (x @ basis) @ basis.T if tall else basis @ (basis.T @ x)


# --- exact global top-k -----------------------------------------------------------------------------


@torch.no_grad()
def _top_k_masks(tensors: Sequence[Tensor], k: int, names: Sequence[str]) -> list[Tensor]:
    """Masks of the k largest |x| over all tensors (ties: earliest tensor, then flat index). 1 ≤ k ≤ total.

    Fast path: a random sample brackets the k-th largest key and a single pass writes every key above the
    bracket and collects the few inside it, where the exact threshold is found. If the bracket misses (the
    sample was unlucky, or huge ties make the bracket crowded) an exact radix select takes over.
    """
    wide = any(tensor.dtype == torch.float64 for tensor in tensors)
    bracket = _sample_bracket(tensors, k, wide)
    masks = _bracketed_select(tensors, names, k, wide, *bracket) if bracket else None
    return masks if masks is not None else _radix_select(tensors, names, k, wide)


def _keys(tensors: Sequence[Tensor], wide: bool) -> Iterator[tuple[int, int, Tensor]]:
    """(tensor position, flat offset, keys of a chunk): the bit patterns of |x|, in a reused buffer."""
    float_dtype, int_dtype = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
    largest = max(tensor.numel() for tensor in tensors)
    buffer = torch.empty(min(_CHUNK, largest), dtype=float_dtype)
    for position, tensor in enumerate(tensors):
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            magnitudes = buffer[: chunk.numel()]
            if chunk.dtype == float_dtype:
                torch.abs(chunk, out=magnitudes)
            else:
                magnitudes.copy_(chunk).abs_()
            yield position, start, magnitudes.view(int_dtype)


def _first_non_finite_key(wide: bool) -> int:
    """Key of +infinity: NaN keys sort above it, every number below."""
    return 0x7FF0 << 48 if wide else 0x7F80 << 16


def _sample_bracket(tensors: Sequence[Tensor], k: int, wide: bool) -> tuple[int, int, int] | None:
    """Keys (lo, hi) that hold the k-th largest key with overwhelming probability, and how many keys the
    bracket may hold before the sample is deemed wrong; from a random sample of the keys.

    The sample only decides speed, never the result, so a fixed seed is fine. None when sampling does not
    pay (few entries) or k is so close to the total that the bracket would hold nearly everything.
    """
    sizes = torch.tensor([tensor.numel() for tensor in tensors])
    ends = sizes.cumsum(0)
    total = int(ends[-1])
    if total <= 8 * _SAMPLE:
        return None
    drawn = torch.randint(total, (_SAMPLE,), generator=torch.Generator().manual_seed(0)).sort().values
    owners = torch.bucketize(drawn, ends, right=True)
    offsets = (drawn - (ends - sizes)[owners]).split(torch.bincount(owners, minlength=len(tensors)).tolist())
    float_dtype = torch.float64 if wide else torch.float32
    values = [tensor.detach().reshape(-1)[at].to(float_dtype) for tensor, at in zip(tensors, offsets, strict=True)]
    ordered = next(_keys([torch.cat(values)], wide))[2].sort().values
    # The k-th largest of all sits near sample index _SAMPLE·(1 − k/total); widen by 8 standard deviations.
    fraction = k / total
    margin = 8 * (_SAMPLE * fraction * (1 - fraction)) ** 0.5 + 32
    low, high = int(_SAMPLE * (1 - fraction) - margin), int(_SAMPLE * (1 - fraction) + margin)
    if low < 0:  # k close to the total: the bracket would hold nearly everything
        return None
    budget = 4 * (min(high, _SAMPLE) - low + 1) * total // _SAMPLE + 4096
    top = int(ordered[high]) if high < _SAMPLE else _first_non_finite_key(wide) - 1  # else: up to the largest
    return int(ordered[low]), top, budget


def _bracketed_select(
    tensors: Sequence[Tensor], names: Sequence[str], k: int, wide: bool, lo: int, hi: int, budget: int
) -> list[Tensor] | None:
    """One pass: keys above ``hi`` are selected, keys in [lo, hi] collected and resolved exactly.

    None when the k-th largest key is not in [lo, hi], or when the bracket holds more than ``budget`` keys
    (collecting them would cost real memory).
    """
    masks = [torch.empty(tensor.shape, dtype=torch.bool) for tensor in tensors]
    scratch = torch.empty(min(_CHUNK, max(tensor.numel() for tensor in tensors)), dtype=torch.bool)
    above, collected, inside, where = 0, 0, [], []
    for position, start, keys in _keys(tensors, wide):
        if int(keys.max()) >= _first_non_finite_key(wide):
            raise BadInputError(f"δ of {names[position]} contains NaN or infinite values")
        out = masks[position].view(-1)[start : start + keys.numel()]
        torch.gt(keys, hi, out=out)
        in_bracket = torch.ge(keys, lo, out=scratch[: keys.numel()]).logical_xor_(out).nonzero().squeeze(1)
        above += int(out.count_nonzero())
        collected += in_bracket.numel()
        if above >= k or collected > budget:
            return None
        inside.append(keys[in_bracket])
        where.append(torch.stack((torch.full_like(in_bracket, position), in_bracket + start)))
    if above + collected < k:
        return None
    # Collected in (tensor, flat index) order, so a stable sort gives ties to the earliest entries.
    chosen = torch.sort(torch.cat(inside), descending=True, stable=True).indices[: k - above]
    positions, flat_indices = torch.cat(where, dim=1)[:, chosen]
    for position in positions.unique().tolist():
        masks[position].view(-1)[flat_indices[positions == position]] = True
    return masks


def _radix_select(tensors: Sequence[Tensor], names: Sequence[str], k: int, wide: bool) -> list[Tensor]:
    """Exact top-k masks by radix select: histograms of successive 16-bit digits of the keys.

    Each pass histograms the next digit of the keys sharing the prefix found so far, until the k-th largest
    key is known exactly; a last pass writes the masks. float32 keys take three passes, float64 five.
    """
    bits = 64 if wide else 32
    shift = bits - _DIGIT_BITS
    prefix, remaining, ties = 0, k, 0  # remaining: how many still to take at or below the current prefix
    for level in range(bits // _DIGIT_BITS):
        histogram = _digit_histogram(tensors, names, wide, shift, prefix if level else None)
        at_or_above = histogram.flip(0).cumsum(0).flip(0)
        digit = int((at_or_above >= remaining).nonzero().max())
        remaining -= int(at_or_above[digit] - histogram[digit])
        prefix = (prefix << _DIGIT_BITS) | digit
        ties = int(histogram[digit])
        shift -= _DIGIT_BITS
    return _write_masks(tensors, wide, threshold=prefix, take_ties=remaining, ties=ties)


def _digit_histogram(
    tensors: Sequence[Tensor], names: Sequence[str], wide: bool, shift: int, prefix: int | None
) -> Tensor:
    """Counts of the 16-bit digit ``key >> shift`` over the keys whose higher bits equal ``prefix``.

    The first pass (``prefix=None``) also rejects NaN and infinity, whose keys sort above every number.
    """
    histogram = torch.zeros(1 << _DIGIT_BITS, dtype=torch.int64)
    first_non_finite = _first_non_finite_key(wide) >> shift if prefix is None else None
    for position, _, keys in _keys(tensors, wide):
        if prefix is not None:
            keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefix]
        digits = (keys >> shift) & ((1 << _DIGIT_BITS) - 1)
        counts = torch.bincount(digits, minlength=1 << _DIGIT_BITS)
        if first_non_finite is not None and counts[first_non_finite:].any():
            raise BadInputError(f"δ of {names[position]} contains NaN or infinite values")
        histogram += counts
    return histogram


def _write_masks(tensors: Sequence[Tensor], wide: bool, threshold: int, take_ties: int, ties: int) -> list[Tensor]:
    """Keys above ``threshold`` plus the first ``take_ties`` of the ``ties`` keys equal to it."""
    masks = [torch.empty(tensor.shape, dtype=torch.bool) for tensor in tensors]
    flat_masks = [mask.view(-1) for mask in masks]
    all_ties = take_ties == ties
    for position, start, keys in _keys(tensors, wide):
        out = flat_masks[position][start : start + keys.numel()]
        if all_ties:
            torch.ge(keys, threshold, out=out)
            continue
        torch.gt(keys, threshold, out=out)
        if take_ties:
            equal = (keys == threshold).nonzero().squeeze(1)[:take_ties]
            out[equal] = True
            take_ties -= equal.numel()
    return masks
