"""Benchmark: overlap statistics of two SFTs on the XLM-R base shape (issue 7 target: ≤ 0.5 s).

Two random SFTs of 14.2 M and 7.6 M entries (the paper's task and language k) spread uniformly over
the maskable parameters of XLM-R base (names and shapes from a meta-device model: no weights). Ours:
``sftkit.overlap`` — totals plus layer and module breakdowns, the full ``--json`` document. Baseline,
measured in the same run: the plain dense computation — per parameter, boolean masks and dense value
arrays of the whole tensor, ``mask_a & mask_b``. Both must give identical counts. ratio = ours / baseline.

    python benchmarks/overlap.py            # XLM-R base shape, ~1 min (mostly building the random SFTs)
    python benchmarks/overlap.py --quick    # small shape for CI, seconds; --json for machines
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import Row, print_rows

from sftkit.overlap import OverlapCounts, overlap_matrix
from sftkit.params import layer_of, maskable_parameters, module_of
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning

TARGET_SECONDS = 0.5
# xlm-roberta-base's config.json (XLMRobertaConfig() defaults to a BERT-size vocabulary of 30522).
FULL = {
    "config": {"vocab_size": 250002, "max_position_embeddings": 514, "type_vocab_size": 1},
    "k": (14_200_000, 7_600_000),
}
QUICK = {
    "config": {
        "vocab_size": 30000,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "k": (1_000_000, 535_000),
}


def parameter_shapes(config_kwargs: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Maskable parameter names and shapes of an XLM-R encoder, built on the meta device (no memory)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    with torch.device("meta"):
        model = XLMRobertaModel(XLMRobertaConfig(**config_kwargs), add_pooling_layer=False)
    return [(name, tuple(param.shape)) for name, param in maskable_parameters(model)]


def distinct_sorted(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """k distinct integers in [0, population), ascending (np.unique is slow on numpy 2.4: sort + mask)."""
    drawn = np.empty(0, dtype=np.int64)
    while drawn.size < k:
        more = rng.integers(0, population, size=int((k - drawn.size) * (1.05 + k / population)) + 1000)
        merged = np.sort(np.concatenate((drawn, more)))
        drawn = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    excess = rng.choice(drawn.size, size=drawn.size - k, replace=False)
    return np.delete(drawn, excess)


def random_sft(shapes, k: int, seed: int, language: str) -> SparseFineTuning:
    """k entries uniformly over all parameters together, normal values (so signs agree half the time)."""
    rng = np.random.default_rng(seed)
    sizes = np.array([int(np.prod(shape)) for _, shape in shapes], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    flat = distinct_sorted(rng, int(offsets[-1]), k)
    bounds = np.searchsorted(flat, offsets)
    values = torch.from_numpy(rng.standard_normal(k, dtype=np.float32))
    diffs = {
        name: SparseDelta(
            shape, torch.from_numpy(flat[bounds[i] : bounds[i + 1]] - offsets[i]), values[bounds[i] : bounds[i + 1]]
        )
        for i, (name, shape) in enumerate(shapes)
    }
    meta = SFTMetadata(
        kind="language", language=language, base_model="xlm-roberta-base", base_fingerprint="sha256:bench"
    )
    return SparseFineTuning(diffs, {}, meta)


def ours(a: SparseFineTuning, b: SparseFineTuning) -> dict[str, OverlapCounts]:
    """The library path behind ``sftkit overlap a b --by layer --json`` plus the module breakdown."""
    matrix = overlap_matrix([a, b])
    matrix.to_json(by="layer")
    pair = matrix.pair(0, 1)
    return {
        "total": pair.total,
        **{f"module:{g}": c for g, c in pair.by("module")},
        **{f"layer:{g}": c for g, c in pair.by("layer")},
    }


def dense_baseline(a: SparseFineTuning, b: SparseFineTuning) -> dict[str, OverlapCounts]:
    """Plain dense comparison: whole-tensor boolean masks and value arrays per parameter."""
    per_parameter = {}
    for name, delta_a in a.diffs.items():
        delta_b = b.diffs[name]
        size = delta_a.numel
        mask_a, mask_b = np.zeros(size, dtype=bool), np.zeros(size, dtype=bool)
        mask_a[delta_a.indices.numpy()] = True
        mask_b[delta_b.indices.numpy()] = True
        dense_a, dense_b = np.zeros(size, dtype=np.float32), np.zeros(size, dtype=np.float32)
        dense_a[delta_a.indices.numpy()] = delta_a.values.numpy()
        dense_b[delta_b.indices.numpy()] = delta_b.values.numpy()
        both = mask_a & mask_b
        shared_a, shared_b = dense_a[both].astype(np.float64), dense_b[both].astype(np.float64)
        per_parameter[name] = OverlapCounts(
            int(mask_a.sum()),
            int(mask_b.sum()),
            int(both.sum()),
            int((np.sign(shared_a) == np.sign(shared_b)).sum()),
            float(np.abs(shared_a).sum()),
            float(np.abs(shared_b).sum()),
        )
    result = {"total": sum(per_parameter.values(), OverlapCounts())}
    for prefix, key in (
        ("module", module_of),
        ("layer", lambda n: str(layer_of(n)) if layer_of(n) is not None else "none"),
    ):
        for name, counts in per_parameter.items():
            group = f"{prefix}:{key(name)}"
            result[group] = result.get(group, OverlapCounts()) + counts
    return result


def timed(function: Callable, *args, repeats: int) -> tuple[float, object]:
    """Median wall time over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def same_counts(x: dict[str, OverlapCounts], y: dict[str, OverlapCounts]) -> bool:
    if x.keys() != y.keys():
        return False
    for key in x:
        p, q = x[key], y[key]
        integers_equal = (p.entries_a, p.entries_b, p.shared, p.same_sign) == (
            q.entries_a,
            q.entries_b,
            q.shared,
            q.same_sign,
        )
        if not integers_equal or not np.allclose([p.abs_sum_a, p.abs_sum_b], [q.abs_sum_a, q.abs_sum_b], rtol=1e-9):
            return False
    return True


def run(quick: bool, repeats: int) -> tuple[list[Row], str]:
    setup = QUICK if quick else FULL
    shapes = parameter_shapes(setup["config"])
    k_task, k_language = setup["k"]
    a, b = random_sft(shapes, k_task, 0, "task-like"), random_sft(shapes, k_language, 1, "language-like")
    ours_time, ours_result = timed(ours, a, b, repeats=repeats)
    base_time, base_result = timed(dense_baseline, a, b, repeats=max(1, repeats // 2))
    shared, base_shared = ours_result["total"].shared, base_result["total"].shared
    baseline = "dense masks"
    rows = [
        # The target is for the full size; --quick is a smoke run of the same code.
        Row("pair + layer/module breakdowns (s)", ours_time, base_time, baseline, ours_time / base_time, "≤ 0.5 s"),
        Row(
            "shared entries (= baseline, every group)", shared, base_shared, baseline, shared / base_shared, "identical"
        ),
    ]
    rows[0].passed = ours_time <= TARGET_SECONDS
    rows[1].passed = same_counts(ours_result, base_result)
    maskable = sum(int(np.prod(shape)) for _, shape in shapes)
    title = (
        f"overlap ({'quick shape' if quick else 'XLM-R base shape'}): {a.num_entries:,} vs {b.num_entries:,} entries "
        f"over {maskable:,} maskable entries in {len(shapes)} parameters; median of {repeats} "
        f"(baseline: {max(1, repeats // 2)}); {torch.get_num_threads()} threads"
    )
    return rows, title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape for CI (seconds)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours (baseline: half as many)")
    args = parser.parse_args(argv)
    rows, title = run(args.quick, args.repeats)
    print_rows(rows, as_json=args.json, title=title)
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
