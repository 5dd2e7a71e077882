"""Benchmark: the registry at 10 000 SFTs (issue 5 targets, SQLite, median: filtered list ≤ 50 ms,
reference resolution ≤ 10 ms; issue 6: registry commands start in ≤ 0.5 s).

Setup: 10 000 rows — 200 languages × 40 versions and 20 tasks × 100 versions, a `best` tag in every
series and a `paper` tag on every first version — inserted through the registry's own ORM schema in
one transaction. Listing and resolving never open artifact files, so none are written (10 000 real
adds would spend minutes in fsync). Ours: ``Registry.find`` / ``Registry.resolve`` through the public
API, each call in its own session as the CLI does, and the SQLAlchemy-free ``SQLiteListing.find`` that
``sftkit list`` uses. Baseline, same run: the obvious implementation —
fetch every record (``find()`` without filters) and filter / pick the newest in Python; both must
return the same records. ratio = ours / baseline (lower is better).

Also measured: fresh ``sftkit --help``, ``list --lang …``, ``show`` and ``tag`` processes against the
10 000-row registry (baseline: a bare ``python -c pass``), and one real ``add`` of a tiny SFT directory
(baseline: copying the directory without hashing, fsync or database).

Shared registry (issue 21): ``add`` of a 14.2 M-entry SFT directory (≈ 114 MB; 1.42 M with ``--quick``)
into S3 — moto's S3 server on 127.0.0.1, in this process — and resolving and reading it (``Registry.load``)
on a second home with an empty cache (download, verify, load), then again from that home's cache; the
baseline is the same add and load on the local store, in the same run. An S3 add uploads, then reads the
whole artifact back to check its sha256 where it landed (the local store re-hashes its copy likewise).

    python benchmarks/registry.py            # full run, ~1 min
    python benchmarks/registry.py --quick    # fewer repetitions (CI), same 10 000 rows; --json for machines
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This script is named like the ``registry`` package: keep its directory off the path until that is imported.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
from sqlalchemy import insert, select  # noqa: E402

from sftkit.registry import Registry  # noqa: E402
from sftkit.registry.listing import SQLiteListing  # noqa: E402
from sftkit.registry.schema import SeriesRow, SFTRow, TagRow  # noqa: E402

sys.path.append(str(HERE))
from _table import Row, print_rows  # noqa: E402

LANGUAGES, LANGUAGE_VERSIONS = 200, 40
TASKS, TASK_VERSIONS = 20, 100
LIST_TARGET_MS, RESOLVE_TARGET_MS, START_TARGET_S = 50.0, 10.0, 0.5


def populate(registry: Registry) -> None:
    """10 000 realistic rows, written straight into the schema (see the module docstring)."""
    rng = random.Random(0)
    series = [("language", f"l{i:03d}", LANGUAGE_VERSIONS) for i in range(LANGUAGES)]
    series += [("task", f"t{i:02d}", TASK_VERSIONS) for i in range(TASKS)]
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    registry.find(limit=1)  # creates the schema
    with registry.db.session(write=True) as session:
        session.execute(
            insert(SeriesRow),
            [{"kind": k, "name": n, "base_model": "xlm-roberta-base", "last_version": v} for k, n, v in series],
        )
        ids = {(row.kind, row.name): row.id for row in session.scalars(select(SeriesRow))}
        rows = []
        for kind, name, versions in series:
            for version in range(1, versions + 1):
                rows.append(
                    {
                        "series_id": ids[kind, name],
                        "version": version,
                        "kind": kind,
                        "language": name if kind == "language" else None,
                        "task": name if kind == "task" else None,
                        "base_model": "xlm-roberta-base",
                        "base_fingerprint": "sha256:" + "0" * 64,
                        "method": rng.choice(["deftx", "lt-sft"]),
                        "rank": rng.choice(["90var", "100", "none"]),
                        "keep": 0.05,
                        "k": 7_600_000,
                        "density": 0.0275,
                        "num_entries": 7_600_000,
                        "sha256": f"{rng.getrandbits(256):064x}",
                        "size_bytes": 60_000_000,
                        "metrics": {"val_loss": rng.random()},
                        "trainer": {"lr": 5e-5, "steps": 30_000},
                        "created": start + timedelta(minutes=len(rows)),
                    }
                )
        session.execute(insert(SFTRow), rows)
        tags = []
        for row in session.execute(select(SFTRow.id, SFTRow.series_id, SFTRow.version)):
            if row.version == 1:
                tags.append({"series_id": row.series_id, "sft_id": row.id, "name": "paper"})
            if row.version == 7:
                tags.append({"series_id": row.series_id, "sft_id": row.id, "name": "best"})
        session.execute(insert(TagRow), tags)


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: statement caches, page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def process_seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def query_rows(registry: Registry, repeats: int, baseline_repeats: int) -> list[Row]:
    everything = lambda: registry.find()  # noqa: E731 - the baseline's one query
    listing = SQLiteListing.open(registry.home, registry.store.local_root)  # what `sftkit list` uses
    assert listing is not None
    finders = (("", registry.find), ("sqlite3 listing: ", listing.find))
    cases = [
        ("list --lang (40 rows)", {"language": "l123"}, lambda r: r.language == "l123"),
        ("list --kind task --task (100 rows)", {"kind": "task", "task": "t07"}, lambda r: r.task == "t07"),
        ("list --tag best (220 rows)", {"tag": "best"}, lambda r: "best" in r.tags),
    ]
    rows = []
    for metric, filters, keep in cases:
        base_ms = median_ms(lambda keep=keep: [r for r in everything() if keep(r)], baseline_repeats)
        for label, find in finders:
            assert find(**filters) == [r for r in everything() if keep(r)], metric
            ours_ms = median_ms(lambda find=find, filters=filters: find(**filters), repeats)
            ok = ours_ms <= LIST_TARGET_MS
            row = Row(label + metric, ours_ms, base_ms, "fetch all + filter", ours_ms / base_ms, "≤ 50 ms", ok)
            rows.append(row)
    listing.close()

    def newest(name: str, version: int | None = None, tag: str | None = None) -> int:
        candidates = [
            r
            for r in everything()
            if r.name == name and (version is None or r.version == version) and (tag is None or tag in r.tags)
        ]
        return max(candidates, key=lambda r: r.version).id

    references = [("l042", ("l042",)), ("lang:l150@17", ("l150", 17)), ("t03@best", ("t03", None, "best"))]
    for reference, plain in references:
        assert registry.resolve(reference).id == newest(*plain), reference
        ours_ms = median_ms(lambda reference=reference: registry.resolve(reference), repeats)
        base_ms = median_ms(lambda plain=plain: newest(*plain), baseline_repeats)
        ok = ours_ms <= RESOLVE_TARGET_MS
        rows.append(Row(f"resolve {reference}", ours_ms, base_ms, "fetch all + pick", ours_ms / base_ms, "≤ 10 ms", ok))
    return rows


def tiny_sft_directory(path: Path, seed: int) -> Path:
    """A real SFT directory (one 64 × 64 delta) for the commands that read or write artifacts."""
    import torch

    from sftkit.sft import SFTMetadata, SparseFineTuning

    generator = torch.Generator().manual_seed(seed)
    deltas = {"encoder.layer.0.attention.self.query.weight": torch.randn(64, 64, generator=generator)}
    sft = SparseFineTuning.from_dense_deltas(deltas, metadata=SFTMetadata(language="xx", base_model="b"))
    return sft.save(path)


def startup_rows(home: Path, repeats: int) -> list[Row]:
    """Fresh ``sftkit`` processes on the 10 000-row registry: the commands that need no model."""
    with Registry.open(home=home) as registry:
        shown = registry.add(tiny_sft_directory(home.parent / "shown", seed=0)).reference
    cli = [sys.executable, "-c", "from sftkit.cli.main import main; main()", "--home", str(home)]
    bare = process_seconds([sys.executable, "-c", "pass"], repeats)
    commands = [
        ("sftkit --help (s)", ["--help"]),
        ("sftkit list --lang (s)", ["list", "--lang", "l123"]),
        ("sftkit show (s)", ["show", shown]),
        ("sftkit tag (s)", ["tag", shown, "fast"]),
    ]
    rows = []
    for metric, args in commands:
        seconds = process_seconds(cli + args, repeats)
        rows.append(Row(metric, seconds, bare, "python -c pass", seconds / bare, "≤ 0.5 s", seconds <= START_TARGET_S))
    return rows


def add_row(root: Path, repeats: int) -> Row:
    """One real add of a tiny SFT directory (copy, hash, fsync, transaction), into a fresh registry."""
    directories = [tiny_sft_directory(root / f"sft-{seed}", seed) for seed in range(repeats + 1)]
    registry = Registry.open(home=root / "home")
    queue = iter(directories)
    ours = median_ms(lambda: registry.add(next(queue)), repeats)
    copies = iter(range(repeats + 1))
    base = median_ms(lambda: shutil.copytree(directories[0], root / f"copy-{next(copies)}"), repeats)
    registry.close()
    return Row("add a tiny SFT directory (ms)", ours, base, "copytree", ours / base, "— (info)", None)


def s3_rows(root: Path, entries: int) -> list[Row]:
    """Add, then resolve-and-read, one large SFT through S3 (moto on 127.0.0.1) against the local store."""
    import logging
    import os
    import socket

    import torch
    from moto.server import ThreadedMotoServer

    from sftkit.sft import SFTMetadata, SparseFineTuning

    columns = 3840
    dense = torch.randn(-(-entries // columns), columns, generator=torch.Generator().manual_seed(0))
    dense.view(-1)[entries:] = 0  # exactly ``entries`` non-zero deltas
    metadata = SFTMetadata(language="xx", base_model="b")
    sft = SparseFineTuning.from_dense_deltas({"encoder.layer.0.output.dense.weight": dense}, metadata=metadata)
    directory = sft.save(root / "large")
    del dense, sft

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench"}
    os.environ.update(aws | {"AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        times: dict[str, dict[str, float]] = {}
        for where, database, artifacts in (
            ("local", None, None),
            ("s3", f"sqlite:///{root / 'shared.db'}", "s3://bench/sftkit"),
        ):
            with Registry.open(home=root / f"{where}-a", url=database, artifacts=artifacts) as registry:
                started = time.perf_counter()
                reference = registry.add(directory).reference
                added = time.perf_counter() - started
            reader_home = root / f"{where}-b" if database else root / f"{where}-a"
            reads = []
            for _ in range(2):  # the second read of a remote artifact comes from the cache
                with Registry.open(home=reader_home, url=database) as registry:
                    started = time.perf_counter()
                    assert registry.load(reference).num_entries == entries
                    reads.append(time.perf_counter() - started)
            times[where] = {"add": added, "cold": reads[0], "warm": reads[1]}
    finally:
        server.stop()
    metrics = {
        "add": f"add a {entries / 1e6:.3g}M-entry SFT to S3 (s)",
        "cold": "resolve + read it on another home, empty cache (s)",
        "warm": "… read it again there, from its cache (s)",
    }
    local, s3 = times["local"], times["s3"]
    return [Row(m, s3[k], local[k], "local store", s3[k] / local[k], "— (info)") for k, m in metrics.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    repeats, baseline_repeats, process_repeats = (20, 2, 3) if args.quick else (200, 5, 7)

    with tempfile.TemporaryDirectory(prefix="sftkit-bench-registry-") as scratch:
        root = Path(scratch)
        with Registry.open(home=root / "big") as registry:
            started = time.perf_counter()
            populate(registry)
            setup = time.perf_counter() - started
            total = len(registry.find())
            rows = query_rows(registry, repeats, baseline_repeats)
        rows += startup_rows(root / "big", process_repeats)
        rows.append(add_row(root / "add", 5 if args.quick else 20))
        rows += s3_rows(root / "s3", 1_420_000 if args.quick else 14_200_000)
    failed = [row.metric for row in rows if row.passed is False]
    title = f"registry: {total} rows on SQLite (inserted in {setup:.1f} s); times in ms unless noted"
    print_rows(rows, as_json=args.json, title=title)
    if failed:
        sys.exit(f"targets missed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
