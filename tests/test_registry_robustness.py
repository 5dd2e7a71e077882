"""Nothing is ever lost: concurrent writers, processes killed mid-add, and bad input of every kind."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import registry_workers
from registry_helpers import backend_url, sft_dirs, tiny_sft

from sftkit.errors import BadInputError, NotFoundError, SftkitError
from sftkit.registry import Registry
from sftkit.registry.artifacts import hash_artifact

LANGUAGES = ("ace", "ban", "bjn", "min")


@pytest.fixture(scope="module")
def fork_server():
    """Children forked from a server that has already imported the registry (fast, torch-free)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["registry_workers", "sftkit.registry.core"])
    return context


def store_entries(registry: Registry, referenced: set[str] = frozenset()) -> set[str]:
    """Every artifact in the store by address, and every file an interrupted upload left in a ``referenced``
    one (in another artifact, it goes with that artifact)."""
    artifacts, temporary = registry.store.inventory()
    leftovers = {key for key, _ in temporary if key.rsplit("/", 2)[-2] in referenced}
    return {registry.store.address(sha) for sha in artifacts} | leftovers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "per_language"), [("sqlite", 50), pytest.param("postgresql", 12, marks=pytest.mark.postgres)]
)
def test_concurrent_adds_get_unique_gap_free_versions(backend, per_language, fork_server, sftkit_home, tmp_path):
    """8 processes × 25 adds on SQLite (× 6 on PostgreSQL, whose run is the extra), all series contended."""
    directories = [d for lang in LANGUAGES for d in sft_dirs(tmp_path / "sfts", per_language, name=lang)]
    random.Random(0).shuffle(directories)
    chunks = [directories[i::8] for i in range(8)]
    with backend_url(backend) as url:
        workers = [
            fork_server.Process(target=registry_workers.add_all, args=(str(sftkit_home), url, chunk))
            for chunk in chunks
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert [w.exitcode for w in workers] == [0] * 8

        with Registry.open(home=sftkit_home, url=url) as registry:
            records = registry.find()
            assert len(records) == len(directories)
            versions = defaultdict(list)
            for record in records:
                versions[record.language].append(record.version)
            expected = list(range(1, per_language + 1))
            assert {lang: sorted(v) for lang, v in versions.items()} == dict.fromkeys(LANGUAGES, expected)
            assert {r.sha256 for r in records} == {hash_artifact(d)[0] for d in directories}
            assert registry.verify() == []


@pytest.mark.slow
def test_killed_adds_leave_a_consistent_registry(fork_server, sftkit_home, tmp_path):
    pool = [d for lang in LANGUAGES[:2] for d in sft_dirs(tmp_path / "sfts", 40, name=lang)]
    rng = random.Random(1234)
    for _ in range(20):
        ready = fork_server.Event()
        batch = rng.sample(pool, len(pool))
        worker = fork_server.Process(
            target=registry_workers.add_until_killed, args=(str(sftkit_home), None, batch, ready)
        )
        worker.start()
        assert ready.wait(60)
        worker.join(timeout=rng.uniform(0.0, 0.3))  # several adds long: the kill lands anywhere in one
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        assert worker.exitcode == -signal.SIGKILL  # it was still adding when it died

    with Registry.open(home=sftkit_home) as registry:
        records = registry.find()
        assert records, "no add ever completed: the kills came too early to test anything"
        assert registry.verify() == []  # no row points at a missing or partial artifact
        by_language = defaultdict(list)
        for record in records:
            by_language[record.language].append(record.version)
        for numbers in by_language.values():  # a killed transaction never burns a version
            assert sorted(numbers) == list(range(1, len(numbers) + 1))
        # What a kill between an add's upload and its row's commit leaves, made for certain: on a quiet machine
        # an add is quick, and 20 kills at random moments can all fall between adds.
        unrecorded = sft_dirs(tmp_path / "unrecorded", 1, name=LANGUAGES[-1])[0]  # not in the killed adds' pool
        registry.store.upload(unrecorded, hash_artifact(unrecorded)[0])
        referenced = {registry.store.address(r.sha256) for r in records}
        orphans = store_entries(registry, {r.sha256 for r in records}) - referenced
        assert registry.store.address(hash_artifact(unrecorded)[0]) in orphans
        assert set(registry.gc(grace_seconds=0)) == orphans  # and whatever the kills left
        assert store_entries(registry, {r.sha256 for r in records}) == referenced
        assert registry.verify() == []


@pytest.fixture
def stocked(sftkit_home):
    """A registry with two SFTs, and a check that they are still intact afterwards."""
    registry = Registry.open(home=sftkit_home)
    records = [registry.add(tiny_sft("ace", seed=1)), registry.add(tiny_sft("sa", kind="task", seed=2))]

    def unharmed() -> None:
        assert {(r.id, r.sha256) for r in registry.find()} == {(r.id, r.sha256) for r in records}
        assert registry.verify() == []
        assert registry.load("ace").num_entries == records[0].num_entries

    yield registry, unharmed
    registry.close()


def test_corrupted_or_truncated_directories_are_refused(stocked, tmp_path):
    registry, unharmed = stocked
    good = tiny_sft("ban", seed=3).save(tmp_path / "ban")

    truncated = Path(shutil.copytree(good, tmp_path / "truncated"))
    weights = truncated / "sft_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(BadInputError, match="corrupted or truncated"):
        registry.add(truncated)

    garbage = Path(shutil.copytree(good, tmp_path / "garbage"))
    (garbage / "sft_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(BadInputError, match="corrupted or truncated"):
        registry.add(garbage)

    bad_json = Path(shutil.copytree(good, tmp_path / "bad-json"))
    (bad_json / "sft_config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        registry.add(bad_json)
    with pytest.raises(BadInputError, match="corrupted or truncated"):
        registry.resolve(str(truncated))
    unharmed()
    assert not registry.store.inventory()[1]  # no upload left a file behind


def test_directories_that_are_not_sfts_are_refused(stocked, tmp_path):
    registry, unharmed = stocked
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match=r"not an SFT directory: sft_config.json and sft_model.safetensors missing"):
        registry.add(empty)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "sft_config.json").write_text('{"model_type": "xlm-roberta"}')
    (model_dir / "sft_model.safetensors").write_bytes(b"")
    with pytest.raises(BadInputError, match="'kind' must be 'language' or 'task'"):
        registry.add(model_dir)
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    with pytest.raises(BadInputError, match="is not a directory"):
        registry.add(a_file)
    with pytest.raises(NotFoundError, match="does not exist"):
        registry.add(tmp_path / "missing")
    bad_name = tiny_sft("ace/../../etc", seed=4).save(tmp_path / "bad-name")
    with pytest.raises(BadInputError, match="is not a valid name"):
        registry.add(bad_name)
    unharmed()


def test_a_damaged_artifact_does_not_block_the_others(stocked):
    registry, _ = stocked
    damaged = registry.resolve("task:sa")
    (damaged.path / "sft_config.json").write_text("{}")
    with pytest.raises(SftkitError, match="does not match its sha256"):
        registry.load("task:sa")
    assert [p.reference for p in registry.verify()] == ["task:sa@1"]
    assert registry.load("ace").metadata.language == "ace"
    healed = registry.add(tiny_sft("sa", kind="task", seed=2))  # re-adding the same content repairs the copy
    assert healed.id == damaged.id and registry.verify() == []


_READ_ONLY_SCRIPT = textwrap.dedent(
    """
    import sys
    from sftkit.registry import Registry
    from sftkit.registry.listing import open_listing
    from sftkit.errors import BadInputError
    listing = open_listing(home=sys.argv[1])
    print("fast listing", type(listing).__name__, sorted(r.reference for r in listing.find()))
    registry = Registry.open(home=sys.argv[1])
    print("listed", sorted(r.reference for r in registry.find()))
    for action in (lambda: registry.add(sys.argv[2]), lambda: registry.tag("ace", "best"),
                   lambda: registry.remove("ace"), registry.gc):
        try:
            action()
        except BadInputError as exc:
            print("refused", exc)
    """
)


def test_a_read_only_home_can_be_read_but_not_written(stocked, tmp_path):
    registry, unharmed = stocked
    new = tiny_sft("ban", seed=3).save(tmp_path / "ban")
    registry.close()
    home = registry.home
    command = [sys.executable, "-c", _READ_ONLY_SCRIPT, str(home), str(new)]
    if os.geteuid() == 0:  # root ignores permission bits unless it gives up the capability to
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a directory read-only")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    modes = {path: path.stat().st_mode for path in [home, *home.rglob("*")]}
    try:
        for path in modes:
            path.chmod(0o555 if path.is_dir() else 0o444)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fast listing SQLiteListing ['lang:ace@1', 'task:sa@1']"
    assert lines[1] == "listed ['lang:ace@1', 'task:sa@1']"
    assert len(lines) == 6 and all("read-only" in line for line in lines[2:]), lines
    unharmed()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg2://nobody@127.0.0.1:9/sftkit", "cannot connect to the registry database"),
        ("sqlite:////nonexistent-dir/sub/registry.db", "cannot connect to the registry database"),
        ("not a url", "not a valid database URL"),
        ("mysql+mysqldb://u@localhost/db", "no driver for"),
    ],
)
def test_an_unusable_database_url_is_one_clear_error(url, message, sftkit_home):
    with pytest.raises(BadInputError, match=message) as caught:
        Registry.open(home=sftkit_home, url=url).find()
    assert "\n" not in str(caught.value)
