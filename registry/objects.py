"""Where artifacts' bytes are kept: one location by URL, each artifact's files under ``<sha[:2]>/<sha256>/``.

A location is a local or shared path, ``s3://bucket/prefix`` (``s3fs``, the ``[s3]`` extra; credentials and
endpoint from the standard AWS variables and files, ``AWS_ENDPOINT_URL`` included) or any fsspec URL whose
backend is installed. Correctness never rests on a lock that spans hosts:

- a file is published whole or not at all: an object store makes a PUT visible atomically; on a file system
  it is written and fsynced under a temporary name in its final directory, then renamed;
- artifacts are content-addressed and immutable, so writers of the same artifact write equal content (the
  hash ignores the safetensors header's key order) and whichever lands last changes nothing;
- after an upload the artifact is hashed again where it landed, before any row may point at it.

Which rows point at which artifact, and when an unreferenced one may go, is the database's call (``core``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sftkit.artifact import ARTIFACT_FILES
from sftkit.errors import BadInputError, SftkitError
from sftkit.registry.artifacts import CHUNK, SHA256_PATTERN, checked_sha256, hash_files
from sftkit.registry.location import artifact_address, local_artifact_root, normalized_artifact_url

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# Given what is moved and how many bytes, a context whose value is told each chunk's size: a progress bar.
TransferProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
TEMPORARY_MARK = ".partial-"  # a file system upload in flight: <name>.partial-<uuid>, renamed when complete
MARKER_NAME = ".registry-id"
# What the flock-based local store of schema ≤ 0003 kept beside the artifacts; no sftkit uses it any more.
_LEGACY_ENTRIES = (".staging", ".trash", ".lock")
PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers end before a bar would be read
_UPLOAD_ATTEMPTS = 3
# Bounded retries: an unreachable endpoint is one clear error within seconds, not minutes of backoff
# (botocore retries; s3fs's own retry loop around it is cut to one pass). AWS_MAX_ATTEMPTS still rules.
_S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60}
_S3_MAX_ATTEMPTS = 3
# One client per location and AWS environment in a process: creating one costs ~0.2 s (botocore's models).
_CLIENTS: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[AbstractFileSystem, str]] = {}
# Locations this process has checked (bucket there, credentials good) and found bound to a registry id.
_REACHABLE: set[int] = set()
_CLAIMED: dict[int, str] = {}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "FSTimeoutError",
}


@dataclass(frozen=True)
class StoredFile:
    """One file of an artifact where it is kept."""

    name: str
    size: int
    modified: float  # seconds since the epoch; by the store's clock for an object store


class ArtifactStore:
    """The artifacts of one registry at one location, addressed by sha256."""

    def __init__(self, url: str, progress: TransferProgress | None = None) -> None:
        self.url = normalized_artifact_url(url)
        self.local_root = local_artifact_root(self.url)
        self.progress = progress
        self._fs: AbstractFileSystem | None = None
        self._root = ""

    @property
    def remote(self) -> bool:
        """True unless the location is a directory of this machine (possibly a shared mount)."""
        return self.local_root is None

    def address(self, sha256: str) -> str:
        """Where the artifact's bytes are, for people: a URL, or a path for a location on this machine."""
        return artifact_address(self.url, sha256)

    def path_for(self, sha256: str) -> Path:
        """The artifact's directory, for a location on this machine's file system."""
        if self.local_root is None:
            raise ValueError(f"{self.url} is not a local directory")
        return self.local_root / sha256[:2] / checked_sha256(sha256)

    # ------------------------------------------------------------------ access
    def _filesystem(self) -> tuple[AbstractFileSystem, str]:
        if self._fs is None:
            import fsspec  # only commands that move or check bytes pay for it

            try:
                if self.local_root is not None:
                    self._fs, self._root = fsspec.filesystem("file"), str(self.local_root)
                else:
                    self._fs, self._root = _client(self.url)
            except ImportError as exc:
                extra = " (pip install 'sftkit[s3]')" if self.url.startswith("s3") else ""
                raise BadInputError(f"no installed backend can open {self.url}: {exc}{extra}") from exc
            except ValueError as exc:
                raise BadInputError(f"{self.url} is not an artifact location sftkit can open: {exc}") from exc
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    def _key(self, sha256: str, name: str | None = None) -> str:
        key = f"{self._filesystem()[1]}/{sha256[:2]}/{checked_sha256(sha256)}"
        return f"{key}/{name}" if name else key

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Storage failures as one clear line naming the location and what to check (never a backend traceback)."""
        try:
            yield
        except SftkitError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                if self.local_root is None:
                    raise  # this machine's disk, not the location: the caller knows which (e.g. the cache)
                raise SftkitError(f"no space left while {action} at {self.url}") from exc
            if isinstance(exc, PermissionError) or _named(exc, {"NoCredentialsError"}):
                reason = _reason(exc)
                raise BadInputError(f"access denied while {action} at {self.url} ({reason}); {self.hint()}") from exc
            if _named(exc, _UNREACHABLE) or isinstance(exc, (ConnectionError, TimeoutError)):
                raise SftkitError(f"cannot reach {self.url} while {action} ({_reason(exc)}); {self.hint()}") from exc
            raise SftkitError(f"storage error while {action} at {self.url}: {_reason(exc)}") from exc
        except Exception as exc:
            if _named(exc, _UNREACHABLE):
                raise SftkitError(f"cannot reach {self.url} while {action} ({_reason(exc)}); {self.hint()}") from exc
            if _named(exc, {"NoCredentialsError", "PartialCredentialsError"}):
                raise BadInputError(f"no usable credentials for {self.url} ({_reason(exc)}); {self.hint()}") from exc
            raise

    def hint(self) -> str:
        """What the user checks when the location cannot be used."""
        if self.url.startswith("s3"):
            return (
                "check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws) "
                "and, for an S3-compatible server, AWS_ENDPOINT_URL"
            )
        if self.local_root is not None:
            return "use a readable and writable directory (--artifact-url / SFTKIT_ARTIFACT_URL)"
        return "check the credentials and endpoint of its fsspec backend"

    def ensure_reachable(self, write: bool = False) -> None:
        """Fail early, in one line, on a missing bucket, wrong credentials or an unreachable endpoint."""
        fs, root = self._filesystem()
        if id(fs) in _REACHABLE and (self.remote or not write):
            return
        if self.local_root is not None:
            if write:
                try:
                    self.local_root.mkdir(parents=True, exist_ok=True)
                    probe = self.local_root / f"{TEMPORARY_MARK}{uuid.uuid4().hex}"
                    probe.touch()
                    probe.unlink()
                except OSError as exc:
                    raise BadInputError(
                        f"the artifact store {self.local_root} is not writable ({exc.strerror or exc}): "
                        "use a writable --home / SFTKIT_HOME (or SFTKIT_STORE, --artifact-url)"
                    ) from exc
        else:
            bucket = root.split("/", 1)[0]
            with self.errors("opening the artifact location"):
                try:
                    fs.info(bucket)
                except FileNotFoundError:
                    raise BadInputError(
                        f"the bucket {bucket!r} of the artifact location {self.url} does not exist: create it, "
                        "or fix --artifact-url / SFTKIT_ARTIFACT_URL"
                    ) from None
        _REACHABLE.add(id(fs))

    def claim(self, registry_id: str) -> None:
        """Bind the location to one registry database.

        ``gc`` deletes what its database does not reference, so a location shared by two databases would
        lose artifacts: refuse that instead. (Two databases claiming one empty location at the same instant
        are not caught; nothing else can be.)
        """
        self.ensure_reachable(write=True)
        fs, root = self._filesystem()
        if _CLAIMED.get(id(fs)) == registry_id and self.remote:
            return
        marker = f"{root}/{MARKER_NAME}"
        with self.errors("opening the artifact location"):
            try:
                owner = fs.cat_file(marker).decode().strip()
            except FileNotFoundError:
                self._publish_bytes((registry_id + "\n").encode(), marker)
                owner = registry_id
        if owner != registry_id:
            raise BadInputError(
                f"the artifact location {self.url} belongs to another registry database (id {owner}, this one is "
                f"{registry_id}): give each registry database its own location"
            )
        _CLAIMED[id(fs)] = registry_id

    # ------------------------------------------------------------------ transfers
    @contextlib.contextmanager
    def _transfer(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.progress is None or total < PROGRESS_MIN_BYTES:
            yield lambda _count: None
            return
        with self.progress(label, total) as advance:
            yield advance

    def upload(self, directory: Path, sha256: str) -> None:
        """Publish the artifact files in ``directory`` as ``sha256``, then hash them where they landed.

        Raises ``SftkitError`` when the copy there does not hash to ``sha256`` (nothing may point at it).
        """
        self.ensure_reachable(write=True)
        files = [(name, directory / name) for name in ARTIFACT_FILES if (directory / name).is_file()]
        total = sum(path.stat().st_size for _, path in files)
        for _ in range(_UPLOAD_ATTEMPTS):
            with self.errors("uploading an artifact"), self._transfer(f"uploading {sha256[:12]}", total) as advance:
                for name, path in files:
                    self._publish(path, self._key(sha256, name), advance)
            landed = self.hash(sha256, present={name: path.stat().st_size for name, path in files})
            if landed is not None:
                break  # else an rm or gc of the same content on another host deleted it meanwhile: again
        if landed != sha256:
            raise SftkitError(
                f"the copy uploaded to {self.address(sha256)} hashes to {str(landed)[:12]}, not {sha256[:12]} "
                "(was the source changed while it was added?): nothing was registered, try again"
            )

    def _publish(self, source: Path, key: str, advance: Callable[[int], None]) -> None:
        fs, _ = self._filesystem()
        if self.local_root is None:
            fs.put_file(str(source), key, callback=_callback(advance))
            return
        target = Path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}{TEMPORARY_MARK}{uuid.uuid4().hex}")
        try:
            with source.open("rb") as reader, temporary.open("wb") as writer:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    advance(len(chunk))
                writer.flush()
                os.fsync(writer.fileno())
            os.rename(temporary, target)
            _fsync_directory(target.parent)
        finally:
            temporary.unlink(missing_ok=True)

    def _publish_bytes(self, data: bytes, key: str) -> None:
        fs, _ = self._filesystem()
        if self.local_root is None:
            fs.pipe_file(key, data)
            return
        target = Path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f"{target.name}{TEMPORARY_MARK}{uuid.uuid4().hex}")
        temporary.write_bytes(data)
        os.rename(temporary, target)

    def download(self, sha256: str, target: Path) -> None:
        """Copy the artifact's files into the directory ``target`` (which the caller then verifies)."""
        fs, _ = self._filesystem()
        files = self.files(sha256)
        with (
            self.errors("downloading an artifact"),
            self._transfer(f"downloading {sha256[:12]}", sum(f.size for f in files.values())) as advance,
        ):
            for name in files:
                fs.get_file(self._key(sha256, name), str(target / name), callback=_callback(advance))

    # ------------------------------------------------------------------ reading
    def files(self, sha256: str) -> dict[str, StoredFile]:
        """The artifact files present at the location (a file still in flight is not one)."""
        fs, _ = self._filesystem()
        self.ensure_reachable()
        with self.errors("listing an artifact"):
            try:
                entries = fs.ls(self._key(sha256), detail=True)
            except (FileNotFoundError, NotADirectoryError):
                return {}
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name in ARTIFACT_FILES:
                found[name] = StoredFile(name, int(entry.get("size") or 0), _modified(entry))
        return found

    def hash(
        self, sha256: str, on_bytes: Callable[[int], None] | None = None, present: dict[str, int] | None = None
    ) -> str | None:
        """The content hash of the copy at the location, read back in full; None when nothing is there.

        ``present`` (file sizes, when the caller just wrote them) spares listing the artifact first.
        """
        fs, _ = self._filesystem()
        if present is None:
            present = {name: stored.size for name, stored in self.files(sha256).items()}
        if not present:
            return None

        def open_file(name: str) -> BinaryIO | None:
            if name not in present:
                return None
            sized = {"size": present[name]} if self.remote else {}  # spares a HEAD per file
            try:
                return fs.open(self._key(sha256, name), "rb", **sized)
            except FileNotFoundError:
                return None

        with self.errors("reading an artifact"):
            try:
                return hash_files(open_file, on_bytes)[0]
            except FileNotFoundError:
                return None  # deleted while being read

    def open_file(self, sha256: str, name: str) -> BinaryIO:
        fs, _ = self._filesystem()
        with self.errors("reading an artifact"):
            return fs.open(self._key(sha256, name), "rb")

    # ------------------------------------------------------------------ removing
    def delete(self, sha256: str) -> None:
        """Remove the artifact's files (those in flight too); a missing artifact is no error."""
        fs, _ = self._filesystem()
        with self.errors("deleting an artifact"), contextlib.suppress(FileNotFoundError):
            fs.rm(self._key(sha256), recursive=True)

    def delete_file(self, key: str) -> None:
        fs, _ = self._filesystem()
        with self.errors("deleting a leftover"), contextlib.suppress(FileNotFoundError):
            fs.rm_file(key)

    def remove_legacy(self) -> list[str]:
        """Delete what an older sftkit's local store kept beside the artifacts (its staging, trash, lock file)."""
        if self.local_root is None:
            return []
        fs, _ = self._filesystem()
        found = [self.local_root / name for name in _LEGACY_ENTRIES if (self.local_root / name).exists()]
        with self.errors("deleting a leftover"):
            for path in found:
                fs.rm(str(path), recursive=path.is_dir())
        return [str(path) for path in found]

    def inventory(self) -> tuple[dict[str, float], list[tuple[str, float]]]:
        """What the location holds: newest modification time per artifact (temporary files included),
        and every temporary file left by an upload with its time. Anything outside the layout is ignored."""
        fs, root = self._filesystem()
        self.ensure_reachable()
        with self.errors("listing the artifact location"):
            try:
                entries = fs.find(root, detail=True)
            except FileNotFoundError:
                entries = {}
        artifacts: dict[str, float] = {}
        temporary: list[tuple[str, float]] = []
        for key, info in entries.items():
            parts = key[len(root) + 1 :].split("/") if key.startswith(root + "/") else []
            if len(parts) != 3 or not SHA256_PATTERN.fullmatch(parts[1]) or parts[0] != parts[1][:2]:
                continue
            modified = _modified(info)
            artifacts[parts[1]] = max(artifacts.get(parts[1], modified), modified)
            if TEMPORARY_MARK in parts[2]:
                temporary.append((key, modified))
        return artifacts, temporary


def _client(url: str) -> tuple[AbstractFileSystem, str]:
    """An fsspec file system for a remote location, shared by the process's stores with the same environment.

    Listings are never cached: another host may have written or deleted a file a moment ago.
    """
    import fsspec

    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (url, environment)
    if key not in _CLIENTS:
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if url.startswith(("s3://", "s3a://")):
            config: dict[str, Any] = dict(_S3_TIMEOUTS)
            if "AWS_MAX_ATTEMPTS" not in os.environ:
                config["retries"] = {"max_attempts": _S3_MAX_ATTEMPTS, "mode": "standard"}
            options["config_kwargs"] = config
        fs, root = fsspec.core.url_to_fs(url, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1
        _CLIENTS[key] = (fs, root)
    return _CLIENTS[key]


def _callback(advance: Callable[[int], None]) -> Any:
    """An fsspec callback that reports each chunk's size to ``advance``."""
    from fsspec.callbacks import Callback

    class _Advance(Callback):
        def relative_update(self, inc: int = 1) -> None:
            advance(inc)

    return _Advance()


def _modified(info: dict[str, Any]) -> float:
    """A listing entry's modification time; unknown counts as now (so it is never thought old)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(exc: BaseException, names: set[str]) -> bool:
    """Whether ``exc`` or an exception it was raised from is of one of the named classes (no botocore import)."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(cls.__name__ in names for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
