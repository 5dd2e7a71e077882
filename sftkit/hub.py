"""Share SFT directories on the Hugging Face Hub and fetch them back (ours or composable-sft's LT-SFT).

Everything goes through ``huggingface_hub``: ``snapshot_download`` (which serves its local cache when
offline or with ``local_files_only``) and ``HfApi.create_repo`` + ``upload_folder``. Its exceptions
become one-line ``BadInputError``s (offline, not found, unauthorised, gated) or ``SftkitError`` (the
Hub failed), so the CLI prints one clear line.

LT-SFT repositories are converted to our format on pull, into ``<sftkit home>/hub/`` keyed by the
commit, so an ``hf:owner/repo`` reference resolves to a normal SFT directory. Their metadata comes from
the caller or, failing that, from composable-sft's documented repo naming
(``{base}-lang-sft-{lang}-small``, ``{base}-task-sft-{task}[-ms]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, errors, is_offline_mode, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from sftkit.artifact import ARTIFACT_FILES, CARD_NAME, LTSFT_FILE, SIDECAR_NAME, sft_name
from sftkit.errors import BadInputError, NotFoundError, SftkitError
from sftkit.interop import detect_format, import_sft

# Files an SFT repo is made of (either format); nothing else in the directory is uploaded.
UPLOAD_PATTERNS = [*ARTIFACT_FILES, LTSFT_FILE, SIDECAR_NAME]
_LANG_REPO = re.compile(r"(?:^|-)lang-sft-([a-z]{2,3})(?:-|$)")
_TASK_REPO = re.compile(r"(?:^|-)task-sft-([A-Za-z0-9_]+?)(?:-ms)?$")


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``owner/repo[@rev]`` (an optional ``hf:`` prefix is accepted) → (repo id, revision or None)."""
    text = spec[3:] if spec.startswith("hf:") else spec
    repo_id, _, revision = text.partition("@")
    if "/" not in repo_id:
        raise BadInputError(f"Hub repo must look like owner/repo[@revision], not {spec!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise BadInputError(f"invalid Hub repo id {repo_id!r}: {str(exc).splitlines()[0]}") from exc
    if "@" in text and not revision:
        raise BadInputError(f"empty revision in {spec!r}")
    return repo_id, revision or None


@contextmanager
def hub_errors(repo_id: str, action: str) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into one clear line each."""
    try:
        import httpx2  # huggingface_hub's HTTP client; its network errors are not wrapped

        network: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    except ImportError:  # pragma: no cover - older huggingface_hub
        network = ()
    try:
        yield
    except errors.RevisionNotFoundError as exc:
        raise NotFoundError(f"{repo_id}: no such revision on the Hub") from exc
    except errors.GatedRepoError as exc:
        raise BadInputError(f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login)") from exc
    except errors.RepositoryNotFoundError as exc:
        raise NotFoundError(
            f"{repo_id} not found on the Hub (or it is private and you are not logged in: hf auth login)"
        ) from exc
    except errors.LocalTokenNotFoundError as exc:
        raise BadInputError(f"cannot {action} {repo_id}: not logged in to the Hub (run hf auth login)") from exc
    except errors.LocalEntryNotFoundError as exc:
        raise BadInputError(
            f"cannot {action} {repo_id}: the Hub is unreachable or offline mode is on (HF_HUB_OFFLINE) "
            "and it is not in the local cache"
        ) from exc
    except errors.OfflineModeIsEnabled as exc:
        raise BadInputError(f"cannot {action} {repo_id}: offline mode is on (unset HF_HUB_OFFLINE)") from exc
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise BadInputError(f"cannot {action} {repo_id}: unauthorised (HTTP {status}); check your token") from exc
        raise SftkitError(f"cannot {action} {repo_id}: the Hub answered {str(exc).splitlines()[0]}") from exc
    except network as exc:
        raise BadInputError(f"cannot {action} {repo_id}: the Hub is unreachable ({type(exc).__name__})") from exc


def _offline() -> bool:
    return is_offline_mode()


def download(repo_spec: str, local_files_only: bool | None = None) -> Path:
    """Snapshot of the repo as it is (either format), from the Hub or the local cache when offline."""
    repo_id, revision = parse_repo_spec(repo_spec)
    offline = _offline() if local_files_only is None else local_files_only
    with hub_errors(repo_id, "download"):
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                local_files_only=offline,
                allow_patterns=UPLOAD_PATTERNS,
                library_name="sftkit",
            )
        )


def metadata_from_repo_name(repo_id: str) -> dict[str, Any]:
    """Kind and name from composable-sft's published repo names, e.g. ``xlmr-lang-sft-ace-small``."""
    name = repo_id.split("/", 1)[1]
    if match := _LANG_REPO.search(name):
        return {"kind": "language", "language": match.group(1)}
    if match := _TASK_REPO.search(name):
        return {"kind": "task", "task": match.group(1)}
    return {}


def repo_overrides(snapshot: Path, repo_id: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata for a pulled snapshot: the user's, completed from the repo name for a bare LT-SFT repo
    (our format and our LT-SFT exports carry their own metadata)."""
    bare_ltsft = detect_format(snapshot) == "lt-sft" and not (snapshot / SIDECAR_NAME).is_file()
    if not bare_ltsft or "kind" in given:
        return dict(given)
    return {**metadata_from_repo_name(repo_id), **given}


def default_cache_root(home: str | os.PathLike[str] | None = None) -> Path:
    """Where converted pulls live: ``<home>/hub`` with home = argument → ``$SFTKIT_HOME`` → ``~/.sftkit``."""
    return Path(home or os.environ.get("SFTKIT_HOME") or "~/.sftkit").expanduser() / "hub"


def pull(
    repo_spec: str,
    overrides: Mapping[str, Any] | None = None,
    base: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Download ``owner/repo[@rev]`` and return an SFT directory in our format.

    Our-format repos are returned as the cached snapshot; LT-SFT repos are converted once per commit
    and metadata (``overrides``, ``base``) into ``cache_root``.
    """
    repo_id, _ = parse_repo_spec(repo_spec)
    snapshot = download(repo_spec, local_files_only=local_files_only)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if detect_format(snapshot) == "sftkit" and not given and base is None:
        return snapshot
    wanted = repo_overrides(snapshot, repo_id, given)
    key = hashlib.sha256(json.dumps([wanted, base], sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = Path(cache_root or default_cache_root()) / f"{repo_id.replace('/', '--')}--{snapshot.name}--{key}"
    if not target.is_dir():
        sft = import_sft(snapshot, wanted, base=base).sft
        meta = sft.metadata
        if sft_name(meta.kind, meta.language, meta.task) is None:
            raise BadInputError(f"cannot tell the {meta.kind} of {repo_id}: pull it with --lang or --task")
        meta.extra.setdefault("hub", {"repo_id": repo_id, "commit": snapshot.name})
        sft.save(target, overwrite=True)
    return target


def push(
    directory: str | os.PathLike[str],
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an SFT directory (either format) with its model card; returns the commit URL."""
    source = Path(directory)
    kind = detect_format(source)
    if not (source / CARD_NAME).is_file():
        raise BadInputError(f"{source} has no model card ({CARD_NAME}); re-save or re-export it first")
    repo_id, revision = parse_repo_spec(repo_id)
    if revision is not None:
        raise BadInputError("push to a repo, not a revision: drop the @revision")
    api = HfApi(token=token, library_name="sftkit")
    with hub_errors(repo_id, "push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=source,
            allow_patterns=UPLOAD_PATTERNS,
            commit_message=commit_message or f"Upload {kind} SFT with sftkit",
        )
    return str(getattr(info, "commit_url", info))
