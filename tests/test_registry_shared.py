"""A registry shared by two machines: one database and one S3 bucket, each machine its own ``SFTKIT_HOME``.

The bucket lives on moto's S3 server on 127.0.0.1 (real HTTP; s3fs talks to it as to AWS). The database is
PostgreSQL when ``SFTKIT_TEST_PG_URL`` names one (CI), and always also a SQLite file both homes open by URL:
on one host that is a faithful stand-in for the database half (SQLite serialises writers where PostgreSQL
uses row locks, and both go through the same code), while the artifacts half — the part that must hold
without any lock spanning hosts — is the real S3 protocol either way. Everything runs through the CLI.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import registry_workers
import torch
from registry_helpers import backend_url, base_sft, sft_dirs, write_stored
from typer.testing import CliRunner

from sftkit.cli.main import app
from sftkit.registry.artifacts import hash_artifact
from sftkit.sft import SparseFineTuning

SHARED = ["sqlite-file", pytest.param("postgresql", marks=pytest.mark.postgres)]
PREFIX = "team/sftkit"


class Machine:
    """``sftkit ARGS…`` as run on one machine: its own home, the shared database and the AWS environment."""

    def __init__(self, home: Path, database: str | None, artifacts: str | None, aws: dict[str, str]) -> None:
        self.home = home
        self.env = {**aws, "SFTKIT_HOME": str(home), "SFTKIT_REGISTRY_URL": database, "SFTKIT_ARTIFACT_URL": artifacts}

    def __call__(self, *args: object, code: int = 0):
        result = CliRunner().invoke(app, [str(a) for a in args], env=self.env)
        assert result.exit_code == code, (args, result.output)
        return result

    def json(self, *args: object):
        return json.loads(self(*args, "--json").stdout)

    def error(self, *args: object, code: int) -> str:
        """The one line a refused command prints (never a traceback)."""
        result = self(*args, code=code)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        return lines[0]


@pytest.fixture(params=SHARED)
def database(request, tmp_path) -> str:
    if request.param == "sqlite-file":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with backend_url("postgresql") as url:
        yield url


@pytest.fixture
def machines(database, s3_bucket, aws_env, tmp_path, monkeypatch) -> tuple[Machine, Machine]:
    """A, who created the registry on the bucket, and B, who only knows the database URL."""
    for name in ("SFTKIT_HOME", "SFTKIT_REGISTRY_URL", "SFTKIT_STORE"):
        monkeypatch.delenv(name, raising=False)
    a = Machine(tmp_path / "home-a", database, f"s3://{s3_bucket}/{PREFIX}", aws_env)
    b = Machine(tmp_path / "home-b", database, None, aws_env)
    return a, b


def tiny_large_sft(path: Path, size_bytes: int) -> Path:
    """An SFT directory of at least ``size_bytes`` (one dense-valued delta)."""
    from sftkit.sft import SFTMetadata

    dense = torch.randn(size_bytes // 8 // 256 + 1, 256, generator=torch.Generator().manual_seed(0))
    metadata = SFTMetadata(language="xx", base_model="b")
    return SparseFineTuning.from_dense_deltas({"encoder.layer.0.output.dense.weight": dense}, metadata=metadata).save(
        path
    )


def bucket_artifacts(bucket: str) -> set[str]:
    """The sha256 of every artifact directory in the bucket, read with a plain S3 client."""
    import s3fs

    keys = s3fs.S3FileSystem(skip_instance_cache=True).find(f"{bucket}/{PREFIX}")
    return {key.split("/")[-2] for key in keys if key.count("/") == PREFIX.count("/") + 4}


@pytest.fixture(scope="module")
def composable(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """A language SFT and a task SFT of the tiny base, as directories."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("composable")
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_base)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    return {
        "ban": base_sft(mlm, "language", "ban", str(tiny_base), 1).save(root / "ban"),
        "sa": base_sft(classifier, "task", "sa", str(tiny_base), 2).save(root / "sa"),
    }


def test_an_sft_imported_on_a_is_listed_shown_composed_exported_and_verified_on_b(
    machines, composable, s3_bucket, tmp_path
):
    a, b = machines
    for directory in composable.values():
        a("import", directory)
    listed = b.json("list")
    assert sorted(r["reference"] for r in listed) == ["lang:ban@1", "task:sa@1"]
    assert all(r["location"] == f"s3://{s3_bucket}/{PREFIX}/{r['sha256'][:2]}/{r['sha256']}" for r in listed)
    assert bucket_artifacts(s3_bucket) == {r["sha256"] for r in listed}

    shown = b("show", "task:sa").stdout
    assert f"s3://{s3_bucket}/{PREFIX}/" in shown and "local copy" in shown
    b("compose", "--task", "sa", "--lang", "ban", "-o", tmp_path / "model-b")
    a("compose", "--task", "sa", "--lang", "ban", "-o", tmp_path / "model-a")
    weights = "model.safetensors"
    assert (tmp_path / "model-b" / weights).read_bytes() == (tmp_path / "model-a" / weights).read_bytes()
    b("export", "ban", "--format", "sftkit", "-o", tmp_path / "exported")
    exported, original = (SparseFineTuning.load(d) for d in (tmp_path / "exported", composable["ban"]))
    assert exported.diffs.keys() == original.diffs.keys()
    assert all(torch.equal(exported.diffs[n].values, original.diffs[n].values) for n in original.diffs)
    assert "all artifacts verified" in b("verify").stdout
    assert b.json("cache")["entries"] == 2  # B downloaded each artifact once

    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).rm(f"{s3_bucket}/{PREFIX}", recursive=True)
    b("compose", "--task", "sa", "--lang", "ban", "-o", tmp_path / "again", "--force")  # from B's cache alone
    assert b.json("cache", "--prune", "--max-size", "0")["entries"] == 0
    assert "artifact of task:sa@1 is missing at s3://" in b.error("show", "task:sa", code=2)


def fork_server():
    """Importers forked from a server that has imported everything an import needs (s3fs and botocore
    included): each child then spends its time importing SFTs, not modules."""
    context = multiprocessing.get_context("forkserver")
    modules = ["registry_workers", "sftkit.cli.main", "sftkit.cli.commands.interop", "sftkit.registry.core"]
    context.set_forkserver_preload([*modules, "sftkit.registry.objects", "sftkit.interop", "sftkit.sft", "s3fs"])
    return context


@pytest.fixture
def server_database(tmp_path) -> str:
    """PostgreSQL when there is one (the multi-host case), else the shared SQLite file: one run either way."""
    if not os.environ.get("SFTKIT_TEST_PG_URL"):
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with backend_url("postgresql") as url:
        yield url


@pytest.mark.slow
def test_concurrent_imports_on_two_machines_get_gap_free_versions(server_database, s3_bucket, aws_env, tmp_path):
    """8 processes × 25 imports, alternating between the two homes, every series contended."""
    bucket = f"s3://{s3_bucket}/{PREFIX}"  # a team sets it on every machine: the first add records it
    a, b = (Machine(tmp_path / f"home-{m}", server_database, bucket, aws_env) for m in "ab")
    languages = ("ace", "ban", "bjn", "min")
    directories = [d for lang in languages for d in sft_dirs(tmp_path / "sfts", 50, name=lang)]
    random.Random(0).shuffle(directories)
    context = fork_server()
    workers = [
        context.Process(target=registry_workers.cli_import_all, args=((a, b)[i % 2].env, directories[i::8]))
        for i in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * 8

    records = b.json("list")
    assert len(records) == 200
    versions = defaultdict(list)
    for record in records:
        versions[record["language"]].append(record["version"])
    assert {lang: sorted(v) for lang, v in versions.items()} == {lang: list(range(1, 51)) for lang in languages}
    assert {r["sha256"] for r in records} == {hash_artifact(d)[0] for d in directories}
    assert bucket_artifacts(s3_bucket) == {r["sha256"] for r in records}  # each stored once, nothing extra
    assert "all artifacts verified" in a("verify").stdout


@pytest.mark.slow
def test_killed_imports_leave_a_consistent_registry_and_gc_removes_exactly_the_orphans(
    server_database, s3_bucket, aws_env, tmp_path
):
    """20 imports killed with SIGKILL at random moments: 5 rounds of 4 importers, two on each machine."""
    bucket = f"s3://{s3_bucket}/{PREFIX}"
    a, b = (Machine(tmp_path / f"home-{m}", server_database, bucket, aws_env) for m in "ab")
    # Each importer gets SFTs of its own: a later importer never adopts what a killed one left behind.
    pool = [d for lang in ("ace", "ban") for d in sft_dirs(tmp_path / "sfts", 60, name=lang)]
    context = fork_server()
    rng = random.Random(4321)
    log = tmp_path / "completed"
    for round_number in range(5):
        round_ = []
        for position, machine in enumerate((a, b, a, b)):
            ready = context.Event()
            own = pool[round_number * 4 + position :: 20]
            args = (machine.env, rng.sample(own, len(own)), ready, str(log))
            round_.append((context.Process(target=registry_workers.cli_import_until_killed, args=args), ready))
        for worker, _ in round_:
            worker.start()
        assert all(ready.wait(60) for _, ready in round_)
        for delay, (worker, _) in zip(sorted(rng.uniform(0.0, 0.6) for _ in round_), round_, strict=True):
            worker.join(timeout=max(0.0, delay))  # a few imports long: each kill lands anywhere in one
            os.kill(worker.pid, signal.SIGKILL)
        for worker, _ in round_:
            worker.join()
            assert worker.exitcode == -signal.SIGKILL  # it was still importing when it died

    records = a.json("list")
    completed = set(log.read_text().split())
    assert completed, "no import ever completed: the kills came too early to test anything"
    assert completed <= {r["sha256"] for r in records}  # every import that returned is registered
    assert "all artifacts verified" in b("verify").stdout  # no row without its complete artifact
    versions = defaultdict(list)
    for record in records:
        versions[record["language"]].append(record["version"])
    for numbers in versions.values():  # a killed transaction never burns a version
        assert sorted(numbers) == list(range(1, len(numbers) + 1))

    referenced = {r["sha256"] for r in records}
    orphans = bucket_artifacts(s3_bucket) - referenced
    assert orphans, "no kill landed between an upload and its row"
    assert "0 unreferenced" in b("gc").stdout  # all younger than the grace period: maybe uploads in flight
    removed = [line.split()[-1] for line in b("gc", "--grace", "0").stdout.splitlines() if line.startswith("removed")]
    assert {address.rsplit("/", 1)[-1] for address in removed} == orphans
    assert bucket_artifacts(s3_bucket) == referenced
    assert "all artifacts verified" in a("verify").stdout


@pytest.mark.slow
def test_rm_on_one_machine_racing_imports_of_the_same_sft_on_another(server_database, s3_bucket, aws_env, tmp_path):
    """A removes the SFT while B imports it again and again: no row is ever left without its artifact."""
    bucket = f"s3://{s3_bucket}/{PREFIX}"
    a, b = (Machine(tmp_path / f"home-{m}", server_database, bucket, aws_env) for m in "ab")
    directory = sft_dirs(tmp_path / "sfts", 1)[0]
    sha = b.json("import", directory)["sha256"]
    context = fork_server()
    codes = {m: tmp_path / f"codes-{m}" for m in "ab"}
    imported = context.Event()  # B imports 30 times; A removes for as long as B is importing
    workers = [
        context.Process(
            target=registry_workers.cli_repeat, args=(a.env, ["rm", f"sha256:{sha}"], str(codes["a"]), None, imported)
        ),
        context.Process(
            target=registry_workers.cli_repeat, args=(b.env, ["import", str(directory)], str(codes["b"]), 30, imported)
        ),
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    removals, imports = ([int(line.split("\t")[0]) for line in codes[m].read_text().splitlines()] for m in "ab")
    outcomes = codes["a"].read_text() + codes["b"].read_text()
    assert set(imports) == {0} and removals.count(0) >= 2, outcomes  # both sides really raced
    assert set(removals) <= {0, 2}, outcomes  # 2: nothing left to remove at that moment
    listed = a.json("list")
    assert "all artifacts verified" in b("verify").stdout
    if listed:  # the last word was an import: its bytes are there
        assert bucket_artifacts(s3_bucket) == {sha}
    b("gc", "--grace", "0")
    assert bucket_artifacts(s3_bucket) == ({sha} if listed else set())


@pytest.mark.postgres
def test_a_laptop_registry_becomes_a_team_registry_on_postgresql_and_s3(composable, s3_bucket, aws_env, tmp_path):
    """migrate-artifacts, then migrate-rows: the team sees the same SFTs, versions, tags and lineage."""
    laptop = Machine(tmp_path / "laptop", None, None, aws_env)
    laptop("import", composable["ban"], "--tag", "paper")
    laptop("import", composable["ban"] / ".." / "sa")
    with backend_url("postgresql") as team_database:
        laptop("db", "migrate-artifacts", "--to", f"s3://{s3_bucket}/{PREFIX}")
        before = laptop.json("list")
        assert "copied 2 SFT(s)" in laptop("db", "migrate-rows", "--to", team_database).stdout
        colleague = Machine(tmp_path / "colleague", team_database, None, aws_env)
        after = colleague.json("list")
        fields = ("id", "reference", "sha256", "tags", "source_reference", "location", "created")
        assert [{f: r[f] for f in fields} for r in after] == [{f: r[f] for f in fields} for r in before]
        colleague("compose", "--task", "sa", "--lang", "ban@paper", "-o", tmp_path / "model")
        retrained = SparseFineTuning.load(composable["ban"])
        for delta in retrained.diffs.values():
            delta.values.mul_(2)
        imported = colleague.json("import", retrained.save(tmp_path / "ban-2"))
        assert (imported["reference"], imported["id"]) == ("lang:ban@2", 3)  # versions and ids go on
        assert "already holds a registry" in laptop.error("db", "migrate-rows", "--to", team_database, code=2)


def test_large_transfers_report_their_progress(composable, s3_bucket, aws_env, tmp_path):
    """The hook behind the CLI's byte bars hears every uploaded and downloaded byte of a large artifact."""
    from sftkit.registry import Registry
    from sftkit.registry.objects import PROGRESS_MIN_BYTES

    large = tiny_large_sft(tmp_path / "large", PROGRESS_MIN_BYTES)
    size = sum(f.stat().st_size for f in large.iterdir())
    heard: dict[str, int] = {}

    @contextlib.contextmanager
    def bar(label: str, total: int):
        assert total == size
        heard[label.split()[0]] = 0

        def advance(count: int) -> None:
            heard[label.split()[0]] += count

        yield advance

    database = f"sqlite:///{tmp_path / 'r.db'}"
    with Registry.open(home=tmp_path / "a", url=database, artifacts=f"s3://{s3_bucket}/p") as registry:
        registry.progress = bar
        reference = registry.add(large).reference
    with Registry.open(home=tmp_path / "b", url=database) as registry:
        registry.progress = bar
        assert registry.load(reference).num_entries > 0
    assert heard == {"uploading": size, "downloading": size}


def test_a_second_machine_is_told_where_the_artifacts_are(database, aws_env, tmp_path, composable, monkeypatch):
    """Without an artifact URL the registry records A's local store; B says it cannot see it, in one line."""
    monkeypatch.delenv("SFTKIT_STORE", raising=False)
    a = Machine(tmp_path / "home-a", database, None, aws_env)
    b = Machine(tmp_path / "home-b", database, None, aws_env)
    a("import", composable["ban"])
    b("show", "ban")  # on one host B sees A's directory …
    shutil.rmtree(a.home / "store")  # … which another machine would not
    line = b.error("show", "ban", code=2)
    assert f"{(a.home / 'store').resolve().as_uri()}, which this machine cannot see" in line
    assert "migrate-artifacts" in line

    other = Machine(tmp_path / "home-c", database, "s3://elsewhere/p", aws_env)
    line = other.error("list", code=2)
    assert "this registry keeps its artifacts at file://" in line and "not s3://elsewhere/p" in line


def test_migrate_artifacts_moves_a_laptop_registry_to_s3_resumably(composable, s3_bucket, aws_env, tmp_path):
    laptop = Machine(tmp_path / "laptop", None, None, aws_env)  # registry.db and store/ in its home
    for directory in composable.values():
        laptop("import", directory)
    before = laptop.json("list")
    target = f"s3://{s3_bucket}/moved"

    from sftkit.registry.objects import ArtifactStore

    ArtifactStore(target).upload(composable["ban"], hash_artifact(composable["ban"])[0])  # a run cut short
    sa = hash_artifact(composable["sa"])[0]
    write_stored(f"{target}/{sa[:2]}/{sa}", "sft_model.safetensors", b"not the weights")  # and a bad copy
    out = laptop("db", "migrate-artifacts", "--to", target).stdout
    assert "1 copied, 1 already there" in out
    after = laptop.json("list")
    assert [(r["reference"], r["sha256"]) for r in after] == [(r["reference"], r["sha256"]) for r in before]
    assert all(r["location"].startswith(f"{target}/") for r in after)  # listed by the sqlite3 fast path
    assert all(r["path"].startswith(str(laptop.home / "cache")) for r in after)
    assert laptop.json("db", "status")["artifacts"] == target
    shutil.rmtree(laptop.home / "store")  # the old copies are no longer used
    assert "all artifacts verified" in laptop("verify").stdout
    laptop("compose", "--task", "sa", "--lang", "ban", "-o", tmp_path / "model")
    assert "already at" in laptop.error("db", "migrate-artifacts", "--to", target, code=2)


def test_storage_failures_are_one_clear_line_and_change_nothing(machines, composable, s3_bucket, tmp_path):
    a, b = machines
    a("import", composable["sa"])
    unchanged = a.json("list")

    unreachable = Machine(a.home, a.env["SFTKIT_REGISTRY_URL"], a.env["SFTKIT_ARTIFACT_URL"], a.env)
    unreachable.env |= {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}  # no backoff to sit out
    assert "cannot reach s3://" in unreachable.error("import", composable["ban"], code=1)
    nowhere = Machine(b.home, b.env["SFTKIT_REGISTRY_URL"], None, unreachable.env)
    assert "AWS_ENDPOINT_URL" in nowhere.error("show", "task:sa", code=1)

    bucketless = Machine(tmp_path / "fresh", f"sqlite:///{tmp_path / 'fresh.db'}", "s3://no-such-bucket/p", a.env)
    assert "the bucket 'no-such-bucket' of the artifact location" in bucketless.error(
        "import", composable["ban"], code=2
    )

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    sha = unchanged[0]["sha256"]
    key = f"{s3_bucket}/{PREFIX}/{sha[:2]}/{sha}/sft_model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01  # same size, one bit off
    fs.pipe_file(key, bytes(data))
    assert "does not match its sha256" in b.error("export", "task:sa", "-o", tmp_path / "out", code=1)
    assert "does not match its sha256" in b.error("compose", "--task", "sa", "-o", tmp_path / "m", code=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
    assert b.json("cache")["entries"] == 0 and not any((b.home / "cache" / ".partial").iterdir())
    problems = json.loads(b("verify", "--json", code=1).stdout)
    assert [(p["reference"], p["problem"]) for p in problems] == [("task:sa@1", "content does not match its sha256")]
    assert a.json("list") == unchanged


def test_wrong_credentials_are_one_clear_line(composable, tmp_path, aws_env):
    """A second moto server that checks credentials (its IAM knows no keys): every request is refused."""
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and server.poll() is None, "moto did not start"
            time.sleep(0.1)
        env = {**aws_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_SECRET_ACCESS_KEY": "wrong"}
        machine = Machine(tmp_path / "home", f"sqlite:///{tmp_path / 'r.db'}", "s3://team/p", env)
        line = machine.error("import", composable["ban"], code=2)
        assert "access denied" in line and "AWS_ACCESS_KEY_ID" in line
        assert machine.json("list") == []
    finally:
        server.terminate()
        server.wait(10)


def test_a_full_disk_during_a_cache_fill_keeps_nothing(machines, composable, tmp_path):
    """B's cache on a 32 KiB tmpfs (a private mount namespace): the download hits ENOSPC mid-way."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a private mount namespace here (unshare -Urm)")
    a, b = machines
    a("import", composable["ban"])
    assert (composable["ban"] / "sft_model.safetensors").stat().st_size > 64 << 10
    cache = b.home / "cache"
    cache.mkdir(parents=True)
    # In the namespace: mount, run the command, then list what it left in the cache (the mount dies with it).
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; c=$1; shift; "$@"; r=$?; find "$c" -type f; exit $r'
    command = [sys.executable, "-c", "from sftkit.cli.main import main; main()", "show", "ban"]
    env = {**os.environ, **{k: v for k, v in b.env.items() if v is not None}}
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", str(cache), *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "no space left in the artifact cache" in lines[0]
    assert result.stdout.strip() == ""  # no file left in the cache, complete or partial (find prints none)


def test_cache_prune_evicts_the_least_recently_used_and_dead_fills(sftkit_home, cli):
    """Four cached artifacts of 1 KiB used at different times, one fill still running, one abandoned."""
    import fcntl

    cache = sftkit_home / "cache"
    used = {}
    for age, digit in enumerate("1234"):
        entry = cache / (digit * 2) / (digit * 64)
        entry.mkdir(parents=True)
        (entry / "sft_model.safetensors").write_bytes(b"x" * 1024)
        used[digit * 64] = 1_000_000 - age * 1000  # "1…" most recently used
        os.utime(entry, (used[digit * 64], used[digit * 64]))
    live, dead = cache / ".partial" / "live", cache / ".partial" / "dead"
    live.mkdir(parents=True)
    dead.mkdir()
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a fill in progress holds it
    try:
        result = cli("cache", "--prune", "--max-size", "2K", "--json")
    finally:
        os.close(holder)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["evicted"] == ["4" * 64, "3" * 64] and report["entries"] == 2 and report["size_bytes"] == 2048
    assert live.is_dir() and not dead.exists()
    assert "'lots' is not a size" in cli("cache", "--prune", "--max-size", "lots").stderr
