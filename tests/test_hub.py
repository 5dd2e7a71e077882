"""Hub push/pull, tested offline: pulls are served from a fake huggingface_hub cache with
``local_files_only``; pushes go to stubbed ``HfApi`` methods that record what would be uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from cli_helpers import one_line_error
from huggingface_hub import constants, errors
from huggingface_hub.utils import filter_repo_objects

from sftkit import hub
from sftkit.errors import BadInputError, NotFoundError, SftkitError
from sftkit.interop import export_sft
from sftkit.sft import SFTMetadata, SparseFineTuning

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache, offline (constants are read at import, so patch them too)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Lay files out as huggingface_hub's cache does: models--owner--name/snapshots/<commit>/… + refs/<ref>."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    if ref is not None:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def small_sft(kind: str = "language") -> SparseFineTuning:
    generator = torch.Generator().manual_seed(5)
    deltas = {
        "encoder.layer.0.intermediate.dense.weight": torch.randn(8, 4, generator=generator)
        * (torch.rand(8, 4, generator=generator) < 0.3),
        "encoder.layer.0.output.dense.bias": torch.tensor([0.0, 0.5, 0.0, -1.0]),
    }
    head = {"classifier.out_proj.weight": torch.randn(3, 4, generator=generator)} if kind == "task" else {}
    metadata = SFTMetadata(
        kind=kind,
        language="ace" if kind == "language" else None,
        task="sa" if kind == "task" else None,
        labels=["a", "b", "c"] if kind == "task" else None,
    )
    return SparseFineTuning.from_dense_deltas(deltas, head, metadata)


def same_deltas(left: SparseFineTuning, right: SparseFineTuning) -> bool:
    return set(left.diffs) == set(right.diffs) and all(
        torch.equal(left.diffs[n].to_dense(), right.diffs[n].to_dense()) for n in left.diffs
    )


# ------------------------------------------------------------------ pull
def test_pull_our_format_from_the_local_cache(hf_cache, tmp_path):
    sft = small_sft()
    snapshot = cache_repo(hf_cache, "someone/ace-sft", sft.save(tmp_path / "src"))
    directory = hub.pull("someone/ace-sft", cache_root=tmp_path / "converted")
    assert directory.resolve() == snapshot.resolve()
    loaded = SparseFineTuning.load(directory)
    assert same_deltas(sft, loaded)
    assert loaded.metadata.language == "ace"
    assert not (tmp_path / "converted").exists()  # nothing to convert


def test_pull_converts_an_ltsft_repo_once_per_commit(hf_cache, tmp_path):
    sft = small_sft()
    exported = export_sft(sft, tmp_path / "lt", format="lt-sft", prefix="roberta")
    (exported / "sftkit_metadata.json").unlink()  # a bare composable-sft repo
    cache_repo(hf_cache, "cambridgeltl/xlmr-lang-sft-ace-small", exported)
    root = tmp_path / "converted"
    directory = hub.pull("hf:cambridgeltl/xlmr-lang-sft-ace-small", cache_root=root)
    assert directory.parent == root
    assert COMMIT in directory.name
    loaded = SparseFineTuning.load(directory)
    assert same_deltas(sft, loaded)
    meta = loaded.metadata
    assert (meta.kind, meta.language, meta.method) == ("language", "ace", "lt-sft")
    assert meta.extra["hub"] == {"repo_id": "cambridgeltl/xlmr-lang-sft-ace-small", "commit": COMMIT}
    stamp = (directory / "sft_config.json").stat().st_mtime_ns
    assert hub.pull("cambridgeltl/xlmr-lang-sft-ace-small", cache_root=root) == directory
    assert (directory / "sft_config.json").stat().st_mtime_ns == stamp
    # other metadata → another conversion, never a stale one
    renamed = hub.pull("cambridgeltl/xlmr-lang-sft-ace-small", {"language": "ban"}, cache_root=root)
    assert renamed != directory and SparseFineTuning.load(renamed).metadata.language == "ban"


def test_pull_a_revision(hf_cache, tmp_path):
    first, second = small_sft("language"), small_sft("task")
    cache_repo(hf_cache, "someone/sft", first.save(tmp_path / "one"), commit=COMMIT, ref="main")
    cache_repo(hf_cache, "someone/sft", second.save(tmp_path / "two"), commit=OTHER_COMMIT, ref="v2")
    assert SparseFineTuning.load(hub.pull("someone/sft")).metadata.kind == "language"
    assert SparseFineTuning.load(hub.pull("someone/sft@v2")).metadata.kind == "task"
    assert SparseFineTuning.load(hub.pull(f"someone/sft@{OTHER_COMMIT}")).metadata.task == "sa"


def test_pull_of_an_uncached_repo_offline_is_one_clear_error(hf_cache):
    with pytest.raises(BadInputError, match="offline") as caught:
        hub.pull("someone/absent")
    assert "\n" not in str(caught.value)


def test_pull_of_an_unnamed_ltsft_repo_asks_for_the_name(hf_cache, tmp_path):
    exported = export_sft(small_sft(), tmp_path / "lt", format="lt-sft", prefix="roberta")
    (exported / "sftkit_metadata.json").unlink()
    cache_repo(hf_cache, "someone/mystery", exported)
    with pytest.raises(BadInputError, match="--lang"):
        hub.pull("someone/mystery", cache_root=tmp_path / "converted")


@pytest.mark.parametrize("spec", ["norepo", "a/b/c", "owner/re po", "owner/repo@"])
def test_bad_repo_specs(spec):
    with pytest.raises(BadInputError):
        hub.parse_repo_spec(spec)


def test_repo_names_of_published_sfts():
    assert hub.metadata_from_repo_name("cambridgeltl/xlmr-lang-sft-ace-small") == {
        "kind": "language",
        "language": "ace",
    }
    assert hub.metadata_from_repo_name("cambridgeltl/mbert-lang-sft-en-small") == {"kind": "language", "language": "en"}
    assert hub.metadata_from_repo_name("cambridgeltl/xlmr-task-sft-nusax_senti-ms") == {
        "kind": "task",
        "task": "nusax_senti",
    }
    assert hub.metadata_from_repo_name("someone/my-model") == {}


# ------------------------------------------------------------------ push
@pytest.fixture
def uploads(monkeypatch):
    """Stub HfApi.create_repo/upload_folder; record the calls and the files that would be sent."""
    calls: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(
            filter_repo_objects(
                [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()],
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        )
        calls.append({"call": "upload_folder", "repo_id": repo_id, "files": files, **kwargs})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid=COMMIT,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_sft_files_and_card_only(uploads, tmp_path):
    directory = small_sft().save(tmp_path / "sft")
    (directory / "notes.txt").write_text("not part of the SFT")
    url = hub.push(directory, "me/ace-sft", private=True)
    assert url.endswith(COMMIT)
    create, upload = uploads
    assert create == {"call": "create_repo", "repo_id": "me/ace-sft", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/ace-sft"
    assert upload["files"] == ["README.md", "sft_config.json", "sft_model.safetensors"]
    assert 'library_name: "sftkit"' in (directory / "README.md").read_text()


def test_push_an_ltsft_export(uploads, tmp_path):
    exported = export_sft(small_sft(), tmp_path / "lt", format="lt-sft", prefix="roberta")
    hub.push(exported, "me/ace-ltsft")
    assert uploads[1]["files"] == ["README.md", "pytorch_diff.bin", "sftkit_metadata.json"]


def test_push_refuses_what_is_not_an_sft(uploads, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="holds no SFT"):
        hub.push(tmp_path / "empty", "me/x")
    with pytest.raises(BadInputError, match="revision"):
        hub.push(small_sft().save(tmp_path / "sft"), "me/x@main")
    assert uploads == []


def test_push_offline_is_one_clear_error(hf_cache, tmp_path):
    """No stub: huggingface_hub itself refuses to connect in offline mode."""
    with pytest.raises(BadInputError, match="offline") as caught:
        hub.push(small_sft().save(tmp_path / "sft"), "me/ace-sft")
    assert "\n" not in str(caught.value)


def _http_error(kind: type[errors.HfHubHTTPError], status: int) -> errors.HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return kind(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (_http_error(errors.HfHubHTTPError, 401), BadInputError, "unauthorised"),
        (_http_error(errors.HfHubHTTPError, 403), BadInputError, "unauthorised"),
        (_http_error(errors.RepositoryNotFoundError, 404), NotFoundError, "not found"),
        (_http_error(errors.GatedRepoError, 403), BadInputError, "gated"),
        (errors.LocalTokenNotFoundError("no token"), BadInputError, "not logged in"),
        (httpx2.ConnectError("refused"), BadInputError, "unreachable"),
        (_http_error(errors.HfHubHTTPError, 500), SftkitError, "answered"),
    ],
)
def test_hub_errors_become_one_line(monkeypatch, tmp_path, error, expected, message):
    def create_repo(self, repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(expected, match=message) as caught:
        hub.push(small_sft().save(tmp_path / "sft"), "me/ace-sft")
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, BadInputError) == (expected is not SftkitError)


# ------------------------------------------------------------------ command line


def test_cli_pull_registers_an_ltsft_repo(cli, hf_cache, tmp_path, sftkit_home):
    sft = small_sft()
    exported = export_sft(sft, tmp_path / "lt", format="lt-sft", prefix="roberta")
    (exported / "sftkit_metadata.json").unlink()
    cache_repo(hf_cache, "cambridgeltl/xlmr-lang-sft-ace-small", exported)
    result = cli("pull", "cambridgeltl/xlmr-lang-sft-ace-small", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["kind"], record["language"], record["method"]) == ("language", "ace", "lt-sft")
    stored = SparseFineTuning.load(record["path"])
    assert stored.metadata.extra["hub"] == {"repo_id": "cambridgeltl/xlmr-lang-sft-ace-small", "commit": COMMIT}
    assert same_deltas(sft, stored)
    assert Path(record["path"]).is_relative_to(sftkit_home)


def test_cli_pull_our_format_and_use_an_hf_reference(cli, hf_cache, tmp_path):
    sft = small_sft("task")
    cache_repo(hf_cache, "someone/sa-sft", sft.save(tmp_path / "src"))
    result = cli("pull", "someone/sa-sft@main", "--tag", "shared")
    assert result.exit_code == 0, result.output
    assert "registered task:sa@1" in result.stdout
    # any command resolves hf: references through the same pull (not registered again)
    result = cli("export", "hf:someone/sa-sft", "--format", "sftkit", "-o", tmp_path / "copy")
    assert result.exit_code == 0, result.output
    assert same_deltas(sft, SparseFineTuning.load(tmp_path / "copy"))


def test_cli_pull_offline_and_uncached_is_one_line(cli, hf_cache):
    assert "offline" in one_line_error(cli("pull", "someone/absent"))
    assert "owner/repo[@revision]" in one_line_error(cli("pull", "not-a-repo"))  # brackets are not markup


def test_cli_push_uploads_a_registered_sft(cli, uploads, tmp_path):
    directory = small_sft().save(tmp_path / "sft")
    assert cli("import", directory).exit_code == 0
    result = cli("push", "ace", "me/ace-sft", "--private")
    assert result.exit_code == 0, result.output
    assert f"commit/{COMMIT}" in result.stdout
    create, upload = uploads
    assert create["private"] is True
    assert upload["files"] == ["README.md", "sft_config.json", "sft_model.safetensors"]
    result = cli("push", "ace", "me/ace-ltsft", "--format", "lt-sft", "--prefix", "roberta")
    assert result.exit_code == 0, result.output
    assert uploads[3]["files"] == ["README.md", "pytorch_diff.bin", "sftkit_metadata.json"]


def test_cli_push_offline_is_one_line(cli, hf_cache, tmp_path):
    directory = small_sft().save(tmp_path / "sft")
    assert cli("import", directory).exit_code == 0
    assert "offline" in one_line_error(cli("push", "ace", "me/ace-sft"))
