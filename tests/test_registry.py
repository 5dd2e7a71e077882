"""The registry API on SQLite and PostgreSQL: CRUD, versions, aliases, lineage, resolution, errors."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from registry_helpers import BACKENDS, backend_url, read_stored, stored_files, tiny_sft, write_stored

from sftkit.errors import BadInputError, BaseMismatchError, NotFoundError, SftkitError
from sftkit.registry import Registry, SFTRecord
from sftkit.registry.artifacts import hash_artifact
from sftkit.sft import SparseFineTuning


@pytest.fixture(params=BACKENDS)
def reg(request, sftkit_home):
    """SQLite with the home's local store, or PostgreSQL with an S3 bucket: the two ends a registry runs on."""
    with backend_url(request.param) as url:
        artifacts = f"s3://{request.getfixturevalue('s3_bucket')}/registry" if url else None
        with Registry.open(home=sftkit_home, url=url, artifacts=artifacts) as registry:
            yield registry


def artifact_dirs(registry: Registry) -> set[str]:
    return set(registry.store.inventory()[0])


def test_add_assigns_gap_free_versions_per_series(reg):
    sft = tiny_sft("ace", seed=1, method="deftx", rank="90var", keep=0.05, k=40, metrics={"val_loss": 1.5})
    first = reg.add(sft)
    second = reg.add(tiny_sft("ace", seed=2))
    other_language = reg.add(tiny_sft("ban", seed=3))
    other_base = reg.add(tiny_sft("ace", seed=4, base_model="other-base", fingerprint="sha256:other"))
    task = reg.add(tiny_sft("sa", kind="task", seed=5))

    assert [r.reference for r in (first, second, other_language, other_base, task)] == [
        "lang:ace@1",
        "lang:ace@2",
        "lang:ban@1",
        "lang:ace@1",
        "task:sa@1",
    ]
    assert (first.kind, first.language, first.task, first.base_model) == ("language", "ace", None, "tiny-base")
    assert (first.method, first.rank, first.keep, first.k, first.metrics) == (
        "deftx",
        "90var",
        0.05,
        40,
        sft.metadata.metrics,
    )
    assert first.num_entries == sft.num_entries
    assert first.size_bytes == sum(f.stat().st_size for f in first.path.iterdir())
    assert len(first.sha256) == 64 and first.path.name == first.sha256
    assert first.created is not None and first.created.tzinfo is not None
    loaded = SparseFineTuning.load(first.path)  # the stored artifact is a plain SFT directory
    for name, delta in sft.diffs.items():
        assert torch.equal(loaded.diffs[name].indices, delta.indices)
        assert torch.equal(loaded.diffs[name].values, delta.values)
    assert (task.kind, task.task, task.language) == ("task", "sa", None)


def test_identical_content_is_stored_once(reg, tmp_path):
    sft = tiny_sft("ace", seed=1)
    first = reg.add(sft)
    again = reg.add(tiny_sft("ace", seed=1), tags=["best"])  # a fresh save: other safetensors header order
    from_dir = reg.add(sft.save(tmp_path / "copy"))
    assert first.id == again.id == from_dir.id and first.reference == "lang:ace@1"
    assert again.tags == ("best",)
    assert len(reg.find()) == 1 and artifact_dirs(reg) == {first.sha256}


def test_versions_are_never_reused_after_removal(reg):
    reg.add(tiny_sft("ace", seed=1))
    second = reg.add(tiny_sft("ace", seed=2))
    removed = reg.remove("lang:ace@2")
    assert removed.id == second.id and not second.path.exists()
    assert reg.add(tiny_sft("ace", seed=3)).reference == "lang:ace@3"
    assert [r.version for r in reg.find(language="ace", sort="version", descending=False)] == [1, 3]


def test_every_reference_form_resolves(reg, tmp_path, monkeypatch):
    one = reg.add(tiny_sft("ace", seed=1), tags=["paper"])
    two = reg.add(tiny_sft("ace", seed=2))
    task = reg.add(tiny_sft("nli", kind="task", seed=3))
    for reference, expected in [
        ("ace", two),
        ("lang:ace", two),
        ("language:ace", two),
        ("ace@latest", two),
        ("lang:ace@1", one),
        ("ace@1", one),
        ("ace@paper", one),
        ("nli", task),
        ("task:nli", task),
        (f"sha256:{one.sha256[:8]}", one),
        (str(one.path), one),  # the stored directory itself: same content, same record
    ]:
        assert reg.resolve(reference).id == expected.id, reference
    assert reg.resolve(one) is one

    outside = tiny_sft("bjn", seed=9).save(tmp_path / "runs" / "bjn")
    record = reg.resolve(str(outside))
    assert record.id is None and record.version is None and record.reference == str(outside.resolve())
    assert (record.kind, record.language, record.path) == ("language", "bjn", outside.resolve())
    assert record.sha256 == reg.add(outside).sha256  # describing and storing hash identically
    monkeypatch.chdir(tmp_path / "runs")
    tiny_sft("xyz", seed=10).save(tmp_path / "runs" / "xyz")
    assert reg.resolve("xyz").language == "xyz"  # a bare name that is only a local directory


def test_resolution_errors_say_what_to_do(reg):
    reg.add(tiny_sft("ace", seed=1))
    reg.add(tiny_sft("sa", seed=2))  # a language code ...
    reg.add(tiny_sft("sa", kind="task", seed=3))  # ... that is also a task

    with pytest.raises(NotFoundError, match=r"no SFT called 'acx'.*did you mean ace.*sftkit list"):
        reg.resolve("acx")
    with pytest.raises(NotFoundError, match=r"versions: 1; tags: none"):
        reg.resolve("lang:ace@7")
    with pytest.raises(NotFoundError, match="versions: 1"):
        reg.resolve("ace@best")
    with pytest.raises(BadInputError, match=r"'sa' is ambiguous: lang:sa@1 .*task:sa@1"):
        reg.resolve("sa")
    assert reg.resolve("task:sa").kind == "task" and reg.resolve("lang:sa").kind == "language"
    with pytest.raises(BadInputError, match="not a valid SFT reference"):
        reg.resolve("model:ace")
    with pytest.raises(BadInputError, match="not a valid tag"):
        reg.resolve("ace@best!")
    with pytest.raises(NotFoundError, match="does not exist"):
        reg.resolve("./no/such/dir")


def test_same_name_on_two_bases_is_ambiguous_until_narrowed(reg):
    tiny = reg.add(tiny_sft("ace", seed=1))
    other = reg.add(tiny_sft("ace", seed=2, base_model="other-base", fingerprint="sha256:other"))
    with pytest.raises(BadInputError, match=r"ambiguous.*base other-base.*base tiny-base"):
        reg.resolve("ace")
    assert reg.resolve("ace", base_model="other-base").id == other.id
    assert reg.resolve(f"sha256:{tiny.sha256[:10]}").id == tiny.id


def test_tags_are_aliases_that_move_within_a_series(reg):
    one = reg.add(tiny_sft("ace", seed=1), tags=["best"])
    two = reg.add(tiny_sft("ace", seed=2))
    ban = reg.add(tiny_sft("ban", seed=3), tags=["best"])
    assert reg.resolve("ace@best").id == one.id

    moved = reg.tag("ace@2", "best")
    assert moved.tags == ("best",) and reg.resolve("ace@best").id == two.id
    assert reg.resolve("lang:ace@1").tags == ()
    assert reg.resolve("ban@best").id == ban.id  # another series keeps its own alias
    assert {r.reference for r in reg.find(tag="best")} == {"lang:ace@2", "lang:ban@1"}

    assert reg.tag("ace@2", "paper").tags == ("best", "paper")
    assert reg.untag("ace@2", "best").tags == ("paper",)
    with pytest.raises(NotFoundError, match="has no tag 'best'"):
        reg.untag("ace@2", "best")
    for bad in ("latest", "7", "has space", ""):
        with pytest.raises(BadInputError, match="not a valid tag"):
            reg.tag("ace", bad)


def test_lineage_links_task_sfts_to_their_source(reg):
    language = reg.add(tiny_sft("id", seed=1))
    by_argument = reg.add(tiny_sft("sa", kind="task", seed=2), source="lang:id")
    recorded = tiny_sft("sa", kind="task", seed=3, source_sft={"reference": "lang:id@1", "sha256": language.sha256})
    by_metadata = reg.add(recorded)
    unknown = tiny_sft("nli", kind="task", seed=4, source_sft={"reference": "lang:xx@4", "sha256": "f" * 64})
    not_registered = reg.add(unknown)

    assert (by_argument.source_id, by_argument.source_reference) == (language.id, "lang:id@1")
    assert (by_metadata.source_id, by_metadata.source_reference) == (language.id, "lang:id@1")
    assert (not_registered.source_id, not_registered.source_reference) == (None, "lang:xx@4")
    assert [r.reference for r in reg.lineage("task:sa@1")] == ["task:sa@1", "lang:id@1"]
    assert [r.reference for r in reg.dependents("id")] == ["task:sa@1", "task:sa@2"]
    reg.add(tiny_sft("ms", seed=5))
    with pytest.raises(BadInputError, match="already registered as task:sa@1 with source lang:id@1, not lang:ms@1"):
        reg.add(tiny_sft("sa", kind="task", seed=2), source="ms")

    with pytest.raises(BadInputError, match=r"lang:id@1 is the source of task:sa@1, task:sa@2.*--force"):
        reg.remove("id")
    assert reg.resolve("id").id == language.id and language.path.is_dir()  # refused: nothing changed
    reg.remove("id", force=True)
    orphan = reg.resolve("task:sa@1")
    assert (orphan.source_id, orphan.source_reference) == (None, "lang:id@1")
    assert not language.path.exists()


def test_a_multi_source_sft_links_every_source(reg):
    ace, ban = reg.add(tiny_sft("ace", seed=1)), reg.add(tiny_sft("ban", seed=2))
    sources = [
        {"language": "ace", "reference": ace.reference, "sha256": ace.sha256},
        {"language": "ban", "reference": ban.reference, "sha256": ban.sha256},
        {"language": "bbc", "reference": "lang:bbc@3", "sha256": "e" * 64},  # not in this registry
    ]
    task = reg.add(tiny_sft("sa", kind="task", seed=3, source_sfts=sources))
    assert reg.sources(task) == ["lang:ace@1", "lang:ban@1", "lang:bbc@3 (not in this registry)"]
    assert [r.reference for r in reg.dependents("ace")] == [r.reference for r in reg.dependents("ban")] == ["task:sa@1"]
    assert reg.sources("ace") == []
    other_base = tiny_sft("sa", kind="task", seed=4, fingerprint="sha256:other", source_sfts=sources[:1])
    with pytest.raises(BaseMismatchError, match="lang:ace@1 was trained on another base model"):
        reg.add(other_base)
    with pytest.raises(BadInputError, match="lang:ban@1 is the source of task:sa@1"):
        reg.remove("ban")
    reg.remove("ban", force=True)
    # the link is gone, the name stays
    assert reg.sources(task) == ["lang:ace@1", "lang:ban@1 (not in this registry)", "lang:bbc@3 (not in this registry)"]
    assert reg.dependents("ace")[0].reference == "task:sa@1"
    reg.remove("task:sa")  # its links go with it
    reg.remove("ace")  # … so nothing depends on ace any more


def test_source_on_another_base_is_refused(reg):
    reg.add(tiny_sft("id", seed=1, base_model="other-base", fingerprint="sha256:other"))
    with pytest.raises(BaseMismatchError, match="another base model"):
        reg.add(tiny_sft("sa", kind="task", seed=2), source="id")
    assert [r.reference for r in reg.find()] == ["lang:id@1"]


def test_find_filters_sorts_and_limits(reg):
    reg.add(tiny_sft("ace", seed=1, method="deftx"), tags=["paper"])
    reg.add(tiny_sft("ace", seed=2, method="lt-sft"))
    reg.add(tiny_sft("ban", seed=3, method="deftx"))
    reg.add(tiny_sft("sa", kind="task", seed=4, method="deftx"))
    reg.add(tiny_sft("ace", seed=5, base_model="other", fingerprint="sha256:o"))

    def refs(**filters):
        return [r.reference for r in reg.find(**filters)]

    assert refs() == ["lang:ace@1", "task:sa@1", "lang:ban@1", "lang:ace@2", "lang:ace@1"]  # newest first
    assert refs(kind="task") == ["task:sa@1"]
    assert refs(kind="lang", language="ace", base_model="tiny-base", sort="version") == ["lang:ace@2", "lang:ace@1"]
    assert refs(method="lt-sft") == ["lang:ace@2"]
    assert refs(tag="paper") == ["lang:ace@1"]
    assert refs(task="sa", method="lt-sft") == []
    assert refs(sort="name", descending=False, limit=3) == ["lang:ace@1", "lang:ace@1", "lang:ace@2"]
    with pytest.raises(BadInputError, match="cannot sort by 'colour'"):
        reg.find(sort="colour")
    with pytest.raises(BadInputError, match="kind must be"):
        reg.find(kind="model")


def test_load_refuses_an_artifact_that_changed(reg):
    sft = tiny_sft("ace", seed=1)
    good = reg.add(sft)
    victim = reg.add(tiny_sft("ban", seed=2))
    loaded = reg.load("ace")
    assert loaded.num_entries == sft.num_entries and loaded.metadata.language == "ace"

    data = bytearray(read_stored(victim.location, "sft_model.safetensors"))
    data[-3] ^= 0xFF  # one flipped bit pattern in the tensor data: still a valid safetensors file
    write_stored(victim.location, "sft_model.safetensors", bytes(data))
    reg.cache.evict(victim.sha256)  # a remote store: as on a machine that has not read it yet
    with pytest.raises(SftkitError, match=r"lang:ban@1 .*does not match its sha256"):
        reg.load("ban")
    assert [(p.reference, p.problem) for p in reg.verify()] == [("lang:ban@1", "content does not match its sha256")]
    assert reg.load(good).num_entries == sft.num_entries  # the others are unharmed


def test_verify_finds_missing_and_incomplete_artifacts_and_gc_collects_orphans(reg, tmp_path):
    kept = reg.add(tiny_sft("ace", seed=1))
    missing = reg.add(tiny_sft("ban", seed=2))
    incomplete = reg.add(tiny_sft("bjn", seed=3))
    assert reg.verify() == []
    for name in ("sft_config.json", "sft_model.safetensors", "README.md"):
        write_stored(missing.location, name, None)
    write_stored(incomplete.location, "sft_model.safetensors", None)
    reg.cache.evict(missing.sha256)
    assert sorted((p.reference, p.problem) for p in reg.verify()) == [
        ("lang:ban@1", "artifact missing"),
        ("lang:bjn@1", "incomplete: sft_model.safetensors missing"),
    ]
    with pytest.raises(NotFoundError, match=r"artifact of lang:ban@1 is missing"):
        reg.load("ban")

    orphan = reg.store.address("ab" * 32)  # an add killed before its row
    for path in tiny_sft("zzz", seed=4).save(tmp_path / "zzz").iterdir():
        write_stored(orphan, path.name, path.read_bytes())
    write_stored(kept.location, "sft_model.safetensors.partial-deadbeef", b"x")  # an upload killed mid-way
    leftover = f"{stored_files(kept.location)[1]}/sft_model.safetensors.partial-deadbeef"
    legacy = set()
    if reg.store.local_root is not None:  # what a pre-issue-21 store kept beside its artifacts
        for name in (".staging/abc/sft", ".trash/def", ".lock"):
            (reg.store.local_root / name).parent.mkdir(parents=True, exist_ok=True)
            (reg.store.local_root / name).write_text("old")
        legacy = {str(reg.store.local_root / name) for name in (".staging", ".trash", ".lock")}
    assert set(reg.gc()) == legacy  # the rest is younger than the grace period: maybe uploads in flight
    assert set(reg.gc(grace_seconds=0)) == {orphan, leftover}
    assert set(reg.store.inventory()[0]) == {kept.sha256, incomplete.sha256} and not reg.store.inventory()[1]
    assert reg.verify() != [] and reg.load(kept).num_entries > 0
    assert reg.gc(grace_seconds=0) == []


def test_record_to_dict_is_json_ready(reg):
    record = reg.add(tiny_sft("ace", seed=1, metrics={"macro_f1": 0.5}), tags=["best"])
    data = json.loads(json.dumps(record.to_dict()))
    assert data["reference"] == "lang:ace@1" and data["tags"] == ["best"] and data["metrics"] == {"macro_f1": 0.5}
    assert data["path"] == str(record.path) and data["created"].startswith(str(record.created.year))
    assert set(data) == {f for f in SFTRecord.__dataclass_fields__}
    assert record.config()["language"] == "ace"


def test_open_reads_home_and_url_from_the_environment(sftkit_home, tmp_path, monkeypatch):
    with Registry.open() as registry:
        assert registry.home == sftkit_home
        registry.add(tiny_sft("ace", seed=1))
    assert (sftkit_home / "registry.db").is_file() and (sftkit_home / "store").is_dir()
    other_db = tmp_path / "elsewhere.db"
    monkeypatch.setenv("SFTKIT_REGISTRY_URL", f"sqlite:///{other_db}")
    monkeypatch.setenv("SFTKIT_STORE", os.fspath(tmp_path / "store2"))
    with Registry.open() as registry:
        assert registry.find() == [] and registry.url.endswith("elsewhere.db")
        assert registry.add(tiny_sft("ace", seed=1)).path.parent.parent == tmp_path / "store2"


def test_content_hash_ignores_header_layout_but_not_content(tmp_path):
    """safetensors writes its metadata map in random order: the same SFT must hash the same."""
    directory = tiny_sft("ace", seed=1).save(tmp_path / "sft")
    digest = hash_artifact(directory)[0]
    weights = directory / "sft_model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    relaid = json.dumps(dict(reversed(list(header.items()))), indent=1).encode()
    relaid += b" " * (-len(relaid) % 8)
    weights.write_bytes(struct.pack("<Q", len(relaid)) + relaid + raw[8 + length :])
    assert SparseFineTuning.load(directory).num_entries == tiny_sft("ace", seed=1).num_entries
    assert hash_artifact(directory)[0] == digest

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert hash_artifact(directory)[0] != digest
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    (directory / "README.md").write_text("another card")
    assert hash_artifact(directory)[0] != digest
