"""The ``Registry`` facade: add, resolve, find, load, tag, remove, verify and collect SFTs.

Where things live: ``home`` (argument → ``$SFTKIT_HOME`` → ``~/.sftkit``) holds ``registry.db``, the
local artifact store ``store/`` (``$SFTKIT_STORE`` moves it) and ``cache/``. ``url`` (argument →
``$SFTKIT_REGISTRY_URL``) selects another database, e.g. a team's PostgreSQL. ``artifact_url`` (argument →
``$SFTKIT_ARTIFACT_URL``) puts the artifacts elsewhere, e.g. ``s3://bucket/prefix``; the registry records
its location (``registry_info.artifact_url``) at its first add, so every machine that opens the database
uses the same one. A SQLite home records nothing until told a location: its store travels with it.

Correct without a lock that spans hosts (the database is the only thing every host shares):

- **add**: the artifact is uploaded completely and hashed where it landed *before* the transaction that
  inserts its row; inside that transaction, after taking the artifact's lock (``artifact_locks``), the
  files are checked to still be there, so a row never commits without its artifact. A killed add leaves
  at most unreferenced files. Concurrent adds of the same content write equal bytes to the same keys,
  and the unique ``sha256`` turns all but one into the existing-row path: stored once.
- **rm**: one transaction deletes the row; a second one takes the artifact's lock, checks that no row
  points at it again and only then deletes the files. An add of the same content waits for that lock and
  then finds the files gone, so it uploads them again before its row commits.
- **gc**: lists the location, reads which artifacts rows reference, and deletes each unreferenced
  artifact inside its own locked transaction that re-checks the rows and the files' age: anything
  written within the grace period (an upload still in flight, which holds no lock yet) stays.

The lock is a primary key that a transaction inserts and deletes again before committing: every other
transaction inserting the same key waits for it, on PostgreSQL across hosts; SQLite serialises writers.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, literal_column, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sftkit.artifact import ARTIFACT_FILES, CONFIG_NAME, sft_name
from sftkit.errors import BadInputError, BaseMismatchError, NotFoundError, SftkitError
from sftkit.registry.artifacts import REQUIRED_FILES, ArtifactInfo, check_sft_directory, hash_artifact, inspect_artifact
from sftkit.registry.cache import ArtifactCache
from sftkit.registry.database import Database
from sftkit.registry.location import (
    ARTIFACT_URL_KEY,
    DB_NAME,
    HEAD,
    artifact_url,
    cache_directory,
    home_directory,
    normalized_artifact_url,
    registry_url,
    sqlite_url,
    store_directory,
    writable_directory,
)
from sftkit.registry.objects import ArtifactStore, TransferProgress
from sftkit.registry.query import Finder, Query
from sftkit.registry.records import SFTRecord, VerifyProblem, canonical_reference
from sftkit.registry.references import ParsedReference, check_name, check_tag, looks_like_path, parse_reference
from sftkit.registry.schema import UNKNOWN_BASE, ArtifactLockRow, InfoRow, SeriesRow, SFTRow, SourceRow, TagRow

if TYPE_CHECKING:
    from sftkit.sft import SparseFineTuning

_ADD_ATTEMPTS = 8
DEFAULT_GRACE_S = 24 * 3600  # gc keeps unreferenced artifacts younger than this: uploads still in flight


class _Retry(Exception):
    """The add must upload (again) and retry: files went missing, or the registry moved its artifacts."""


class Registry(Finder):
    """SFT rows in a SQL database plus their artifacts in a content-addressed store."""

    def __init__(
        self,
        home: Path,
        database: Database,
        local_store: Path,
        artifact_location: str | None = None,
        readonly: bool = False,
        home_database: bool = False,
    ) -> None:
        self.home = home
        self.db = database
        self.readonly = readonly
        self.cache = ArtifactCache(cache_directory(home))
        self.progress: TransferProgress | None = None  # set by a caller that draws transfer bars
        self._local_store = normalized_artifact_url(str(local_store))
        self._requested = normalized_artifact_url(artifact_location) if artifact_location else None
        self._store: ArtifactStore | None = None
        self._home_database = home_database  # the home's own SQLite file: its store travels with it
        self._claimed: str | None = None
        self._schema_checked = False

    @classmethod
    def open(
        cls,
        home: str | os.PathLike[str] | None = None,
        url: str | None = None,
        store: str | os.PathLike[str] | None = None,
        artifacts: str | None = None,
    ) -> Registry:
        """Open (or, on first use, create) a registry. Cheap: the database is contacted lazily.

        ``store`` is this machine's local artifact directory; ``artifacts`` (or ``$SFTKIT_ARTIFACT_URL``) a
        location by URL, which must agree with the one the registry recorded. A read-only home still
        opens for reading; writing then fails with a clear message.
        """
        home_dir = home_directory(home)
        url = registry_url(url)
        store_dir = store_directory(home_dir, store)
        readonly = False
        home_database = url is None or url == sqlite_url(home_dir / DB_NAME)
        if url is None:
            db_path = home_dir / DB_NAME
            if not writable_directory(home_dir):
                if not db_path.is_file():
                    raise BadInputError(
                        f"no registry in {home_dir}, and it is not writable so none can be created: "
                        "use a writable --home / SFTKIT_HOME"
                    )
                readonly = True
            url = sqlite_url(db_path, readonly=readonly)
        database = Database(url, readonly=readonly)
        return cls(home_dir, database, store_dir, artifact_url(artifacts), readonly, home_database)

    def close(self) -> None:
        self.db.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.db.display_url

    # ------------------------------------------------------------------ plumbing
    def _ready(self) -> None:
        if not self._schema_checked:
            self.db.check_schema()
            self._schema_checked = True

    @property
    def store(self) -> ArtifactStore:
        """Where this registry's artifacts are (the recorded location, checked against the one asked for)."""
        if self._store is None:
            self._ready()
            with self.db.session() as session:
                location = self._location(session)
            self._store = ArtifactStore(location, progress=self.progress)
        return self._store

    def _location(self, session: Session, lock: bool = False) -> str:
        """The artifact location: recorded, else asked for, else this machine's local store.

        ``lock`` (in a write transaction) holds the record shared until commit, so that
        ``migrate-artifacts`` cannot switch it under an add in flight.
        """
        query = select(InfoRow.value).where(InfoRow.key == ARTIFACT_URL_KEY)
        query = query.with_for_update(read=True) if lock else query
        recorded = session.scalar(query)
        if recorded is None and self._requested and self._requested != self._local_store:
            rows = session.scalar(select(SFTRow.id).limit(1)) is not None
            recorded = session.scalar(query)  # read again: a first add may have committed between the two reads
            if rows and recorded is None:
                raise BadInputError(
                    f"this registry keeps its SFTs in the local store {self._local_store}, not {self._requested}: "
                    f"move them there first (`sftkit db migrate-artifacts --to {self._requested}`)"
                )
        if recorded is None:
            return self._requested or self._local_store
        if self._requested and self._requested != recorded:
            raise BadInputError(
                f"this registry keeps its artifacts at {recorded}, not {self._requested}: drop --artifact-url / "
                f"SFTKIT_ARTIFACT_URL to use them, or move them (`sftkit db migrate-artifacts --to {self._requested}`)"
            )
        return recorded

    def _settle_location(self, session: Session, store: ArtifactStore) -> None:
        """In a write transaction: fail over to a retry if the location moved, record it on first use.

        A database outside the home (a server, a shared file) records even the default local store, so that
        another machine opening it says where the artifacts are instead of silently missing them.
        """
        current = self._location(session, lock=True)
        if current != store.url:
            self._store = None
            raise _Retry
        recorded = session.get(InfoRow, ARTIFACT_URL_KEY)
        if recorded is None and (self._requested or not self._home_database):
            session.add(InfoRow(key=ARTIFACT_URL_KEY, value=store.url))
            session.flush()
        self._claim(store, session)

    def _claim(self, store: ArtifactStore, session: Session) -> None:
        """Bind the location to this database once per process (see ``ArtifactStore.claim``)."""
        if self._claimed != store.url:
            store.claim(self._registry_id(session))
            self._claimed = store.url

    def use_location(self, url: str) -> None:
        """Use the artifact location ``url`` from now on (``migrate-artifacts`` has just recorded it)."""
        self._requested = normalized_artifact_url(url)
        self._store = None

    def check_writable(self, action: str) -> None:
        if self.readonly:
            raise BadInputError(
                f"the registry home {self.home} is read-only: cannot {action} (use a writable --home / SFTKIT_HOME)"
            )
        self._ready()

    def _record(self, row: SFTRow) -> SFTRecord:
        store = self.store
        local = self.cache.path_for(row.sha256) if store.remote else store.path_for(row.sha256)
        return row.to_record(local, store.address(row.sha256))

    def _registry_id(self, session: Session) -> str:
        return session.get_one(InfoRow, "registry_id").value

    # ------------------------------------------------------------------ adding
    def add(
        self,
        sft_or_dir: SparseFineTuning | str | os.PathLike[str],
        tags: Iterable[str] = (),
        source: SFTRecord | str | os.PathLike[str] | None = None,
    ) -> SFTRecord:
        """Store an SFT (object or directory) as the next version of its series and return its record.

        Adding content that is already stored returns the existing record (tags are added to it).
        ``source`` (a record or reference) is the language SFT a task SFT was trained on top of; when
        omitted it is looked up from ``metadata.source_sft["sha256"]``. A multi-source task SFT's sources
        (``metadata.source_sfts``) are linked the same way, each one found by its sha256.
        """
        tags = tuple(check_tag(tag) for tag in dict.fromkeys(tags))
        self.check_writable("add SFTs")
        if isinstance(sft_or_dir, (str, os.PathLike)):
            check_sft_directory(sft_or_dir)  # a clear error about the user's directory, before any transfer
        source_record = source if source is None or isinstance(source, SFTRecord) else self._registered(source)
        with _local_directory(sft_or_dir) as directory:
            info = inspect_artifact(directory)
            fields = _row_fields(info)
            sizes = {name: (directory / name).stat().st_size for name in ARTIFACT_FILES if (directory / name).is_file()}
            with self.db.session() as session:
                known = session.scalar(select(SFTRow.id).where(SFTRow.sha256 == info.sha256)) is not None
                self._claim(self.store, session)  # before any byte lands in another registry's location
            if not known:
                self.store.upload(info.path, info.sha256)  # idempotent: equal bytes under the same keys
            for attempt in range(1, _ADD_ATTEMPTS + 1):
                store = self.store
                try:
                    record = self._insert(store, info, fields, sizes, tags, source_record)
                    break
                except (IntegrityError, _Retry) as exc:  # a concurrent writer took the key, or the files are gone
                    if attempt == _ADD_ATTEMPTS:
                        raise SftkitError(f"could not add {info.path}: concurrent writers kept clashing") from exc
                    if isinstance(exc, _Retry) and self._store is not None:
                        store.upload(info.path, info.sha256)
            if store.remote:
                self.cache.adopt(directory, info.sha256)  # this machine never downloads what it uploaded
        return record

    def _insert(
        self,
        store: ArtifactStore,
        info: ArtifactInfo,
        fields: dict[str, Any],
        sizes: dict[str, int],
        tags: Sequence[str],
        source: SFTRecord | None,
    ) -> SFTRecord:
        """The row (new, or the existing one for this content), committed only while the files are in place.

        Raises ``_Retry`` when the files are missing: the caller uploads them and tries again.
        """
        with self.db.session(write=True) as session, _artifact_lock(session, info.sha256):
            self._settle_location(session, store)
            existing = session.scalar(select(SFTRow).where(SFTRow.sha256 == info.sha256))
            if existing is not None:
                if source is not None and existing.source_id != source.id:
                    raise BadInputError(
                        f"this SFT is already registered as {existing.reference} with source "
                        f"{existing.source_reference or 'none'}, not {source.reference}"
                    )
                if not _same_sizes(store, info.sha256, sizes):
                    raise _Retry  # heal a lost or damaged copy
                self._apply_tags(session, existing, tags)
                return self._record(existing)
            if not _same_sizes(store, info.sha256, sizes):
                raise _Retry  # not uploaded yet, or removed by an rm / gc of the same content since
            source_row, source_reference = self._source_of(session, source, info.config, fields)
            series = _series_for_update(session, fields["kind"], fields["name"], fields["base_model"])
            series.last_version += 1
            row = SFTRow(
                series_id=series.id,
                version=series.last_version,
                **{key: value for key, value in fields.items() if key != "name"},
                sha256=info.sha256,
                size_bytes=info.size_bytes,
                source_id=source_row.id if source_row is not None else None,
                source_reference=source_reference,
                created=datetime.now(timezone.utc),
            )
            session.add(row)
            session.flush()
            self._link_sources(session, row, info.config, fields)
            self._apply_tags(session, row, tags)
            return self._record(row)

    def _source_of(
        self, session: Session, source: SFTRecord | None, config: dict[str, Any], fields: dict[str, Any]
    ) -> tuple[SFTRow | None, str | None]:
        """The source-language row (if registered) and its reference, checked against our base."""
        lineage = config.get("source_sft") if isinstance(config.get("source_sft"), dict) else {}
        if source is not None:
            if source.id is None:
                raise BadInputError(f"the source SFT {source.reference} must be registered first (`sftkit import DIR`)")
            row = session.get(SFTRow, source.id)
            if row is None:
                raise NotFoundError(f"the source SFT {source.reference} is no longer in the registry")
        else:
            row = _row_by_lineage(session, lineage)
            if row is None:
                return None, lineage.get("reference")
        _check_same_base(row, fields)
        return row, row.reference

    @staticmethod
    def _link_sources(session: Session, row: SFTRow, config: dict[str, Any], fields: dict[str, Any]) -> None:
        """One ``sft_sources`` row per source of a multi-source task SFT, registered or not."""
        for position, lineage in enumerate(config.get("source_sfts") or []):
            lineage = lineage if isinstance(lineage, dict) else {}
            source = _row_by_lineage(session, lineage)
            if source is not None:
                _check_same_base(source, fields)
            reference = source.reference if source is not None else lineage.get("reference")
            session.add(
                SourceRow(
                    sft_id=row.id, position=position, source_id=source.id if source else None, reference=reference
                )
            )

    @staticmethod
    def _apply_tags(session: Session, row: SFTRow, tags: Sequence[str]) -> None:
        """Attach aliases to ``row``, moving each away from the version of the series that had it."""
        for tag in tags:
            if any(existing.name == tag for existing in row.tags):
                continue
            session.execute(
                delete(TagRow).where(TagRow.series_id == row.series_id, TagRow.name == tag, TagRow.sft_id != row.id)
            )
            row.tags.append(TagRow(series_id=row.series_id, name=tag))
        session.flush()

    # ------------------------------------------------------------------ resolving
    def resolve(self, ref: SFTRecord | str | os.PathLike[str], base_model: str | None = None) -> SFTRecord:
        """Record for a reference (see ``sftkit.registry.references``) or an SFT directory path.

        ``base_model`` narrows a name that exists for several base models. Raises ``NotFoundError``
        (suggesting ``sftkit list``) or ``BadInputError`` listing the candidates when ambiguous.
        """
        if isinstance(ref, SFTRecord):
            return ref
        text = os.fspath(ref).strip()
        if isinstance(ref, os.PathLike) or looks_like_path(text):
            return self.describe_directory(text)
        parsed = parse_reference(text)
        self._ready()
        try:
            with self.db.session() as session:
                return self._record(self._find_row(session, parsed, text, base_model))
        except NotFoundError:
            if (Path(text) / CONFIG_NAME).is_file():  # a bare name that is only a local SFT directory
                return self.describe_directory(text)
            raise

    def _find_row(self, session: Session, parsed: ParsedReference, text: str, base_model: str | None) -> SFTRow:
        if parsed.sha_prefix:
            rows = session.scalars(select(SFTRow).where(SFTRow.sha256.startswith(parsed.sha_prefix)).limit(2)).all()
            if not rows:
                raise NotFoundError(f"no SFT has a sha256 starting with {parsed.sha_prefix} (`sftkit list` shows them)")
            if len(rows) > 1:
                raise BadInputError(f"sha256:{parsed.sha_prefix} matches several SFTs: give more digits")
            return rows[0]
        query = select(SeriesRow).where(SeriesRow.name == parsed.name)
        if parsed.kind:
            query = query.where(SeriesRow.kind == parsed.kind)
        if base_model:
            query = query.where(SeriesRow.base_model == base_model)
        series = session.scalars(query.order_by(SeriesRow.kind, SeriesRow.base_model)).all()
        candidates = [row for row in (self._row_in_series(session, s, parsed) for s in series) if row is not None]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            listed = ", ".join(
                f"{row.reference} [base {row.base_model or 'unknown'}, sha256:{row.sha256[:12]}]" for row in candidates
            )
            raise BadInputError(
                f"{text!r} is ambiguous: {listed} — write one of them (lang:/task: prefix, or sha256:<prefix>)"
            )
        raise NotFoundError(self._not_found_message(session, parsed, text, series))

    @staticmethod
    def _row_in_series(session: Session, series: SeriesRow, parsed: ParsedReference) -> SFTRow | None:
        query = select(SFTRow).where(SFTRow.series_id == series.id)
        if parsed.version is not None:
            query = query.where(SFTRow.version == parsed.version)
        elif parsed.alias is not None:
            query = query.join(TagRow, TagRow.sft_id == SFTRow.id).where(TagRow.name == parsed.alias)
        return session.scalar(query.order_by(SFTRow.version.desc()).limit(1))

    def _not_found_message(
        self, session: Session, parsed: ParsedReference, text: str, series: Sequence[SeriesRow]
    ) -> str:
        if not series:
            names = session.scalars(select(SeriesRow.name).distinct()).all()
            close = difflib.get_close_matches(parsed.name or "", names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return f"no SFT called {text!r} in the registry {self.url}{hint}; `sftkit list` shows what is registered"
        ids = [s.id for s in series]
        versions = session.scalars(select(SFTRow.version).where(SFTRow.series_id.in_(ids)).order_by(SFTRow.version))
        have = ", ".join(str(v) for v in dict.fromkeys(versions))
        if not have:
            return f"no SFT called {text!r} is left in the registry (all its versions were removed)"
        tags = ", ".join(sorted(set(session.scalars(select(TagRow.name).where(TagRow.series_id.in_(ids)))))) or "none"
        return f"{text!r} matches no version (versions: {have}; tags: {tags}); `sftkit list` shows what is registered"

    def _registered(self, ref: SFTRecord | str | os.PathLike[str]) -> SFTRecord:
        record = self.resolve(ref)
        if record.id is None:
            raise BadInputError(f"{record.reference} is not in the registry (register it first: `sftkit import DIR`)")
        return record

    def describe_directory(self, path: str | os.PathLike[str]) -> SFTRecord:
        """Record of an SFT directory; the registry's own record if the same content is registered.

        An unregistered directory gets ``id=None``, ``version=None`` and its absolute path as reference.
        """
        info = inspect_artifact(path)
        self._ready()
        with self.db.session() as session:
            row = session.scalar(select(SFTRow).where(SFTRow.sha256 == info.sha256))
            if row is not None:
                return self._record(row)
        columns = _row_fields(info)
        del columns["name"]
        columns["base_model"] = columns["base_model"] or None
        lineage = info.config.get("source_sft") if isinstance(info.config.get("source_sft"), dict) else {}
        location = info.path.resolve()
        return SFTRecord(
            id=None,
            reference=str(location),
            version=None,
            **columns,
            sha256=info.sha256,
            size_bytes=info.size_bytes,
            source_reference=lineage.get("reference"),
            created=datetime.fromtimestamp((location / CONFIG_NAME).stat().st_mtime, timezone.utc),
            path=location,
        )

    def local_copy(self, record: SFTRecord) -> Path:
        """A local directory with the SFT's files: the store itself, or the cache (filled and verified once)."""
        if record.id is None or record.path is None:
            return record.path  # a directory outside the registry
        store = self.store
        if store.remote:
            return self.cache.fill(store, record.sha256, record.reference)
        if not (record.path / CONFIG_NAME).is_file():
            if store.local_root is not None and not store.local_root.is_dir():
                raise NotFoundError(
                    f"this registry keeps its artifacts in {store.url}, which this machine cannot see: mount it "
                    "there, or move them to a shared location (`sftkit db migrate-artifacts --to s3://…`)"
                )
            raise NotFoundError(
                f"the artifact of {record.reference} is missing at {record.path} (`sftkit verify` lists every "
                "damaged SFT)"
            )
        return record.path

    def load(self, rec_or_ref: SFTRecord | str | os.PathLike[str]) -> SparseFineTuning:
        """The SFT itself, after checking that its files still hash to the recorded sha256."""
        record = self.resolve(rec_or_ref)
        cached = record.id is not None and self.store.remote and self.cache.path_for(record.sha256).is_dir()
        path = self.local_copy(record)
        if (cached or not self.store.remote or record.id is None) and hash_artifact(path)[0] != record.sha256:
            if not cached:
                raise SftkitError(
                    f"the artifact of {record.reference} at {path} does not match its sha256 {record.short_sha}: "
                    "it was modified or damaged, so it is not loaded (`sftkit verify`; re-add it from its source)"
                )
            self.cache.evict(record.sha256)  # a damaged cached copy: fetch (and verify) it again
            path = self.local_copy(record)
        from sftkit.sft import SparseFineTuning  # torch only when an SFT is loaded: `list`/`show` never do

        return SparseFineTuning.load(path)

    # ------------------------------------------------------------------ querying
    def run_query(self, query: Query) -> list[SFTRecord]:
        statement = select(SFTRow)
        for column, value in query.equalities.items():
            statement = statement.where(getattr(SFTRow, column) == value)
        if query.tag is not None:
            statement = statement.where(SFTRow.id.in_(select(TagRow.sft_id).where(TagRow.name == query.tag)))
        columns = [literal_column(expression) for expression in query.order]
        statement = statement.order_by(*(column.desc() if query.descending else column.asc() for column in columns))
        if query.limit is not None:
            statement = statement.limit(query.limit)
        self._ready()
        with self.db.session() as session:
            return [self._record(row) for row in session.scalars(statement)]

    def lineage(self, ref: SFTRecord | str | os.PathLike[str]) -> list[SFTRecord]:
        """The SFT followed by its source, the source's source, … (registered ones only)."""
        chain = [self.resolve(ref)]
        self._ready()
        with self.db.session() as session:
            while chain[-1].source_id is not None and len(chain) < 100:
                row = session.get(SFTRow, chain[-1].source_id)
                if row is None or any(record.id == row.id for record in chain):
                    break
                chain.append(self._record(row))
        return chain

    def dependents(self, ref: SFTRecord | str | os.PathLike[str]) -> list[SFTRecord]:
        """Registered SFTs that name this one as their source (single- or multi-source)."""
        record = self._registered(ref)
        with self.db.session() as session:
            return [self._record(row) for row in _children(session, record.id)]

    def sources(self, ref: SFTRecord | str | os.PathLike[str]) -> list[str]:
        """A multi-source task SFT's sources in training order: their references (empty for other SFTs)."""
        record = self._registered(ref)
        with self.db.session() as session:
            rows = session.scalars(select(SourceRow).where(SourceRow.sft_id == record.id).order_by(SourceRow.position))
            return [
                session.get(SFTRow, link.source_id).reference
                if link.source_id is not None
                else f"{link.reference or 'unknown'} (not in this registry)"
                for link in rows
            ]

    # ------------------------------------------------------------------ changing
    def tag(self, ref: SFTRecord | str | os.PathLike[str], alias: str) -> SFTRecord:
        """Give a version an alias (``best``, ``paper`` …); it moves off any other version of the series."""
        alias = check_tag(alias)
        self.check_writable("tag SFTs")
        record = self._registered(ref)
        with self.db.session(write=True) as session:
            row = self._row_by_id(session, record)
            self._apply_tags(session, row, [alias])
            session.refresh(row)
            return self._record(row)

    def untag(self, ref: SFTRecord | str | os.PathLike[str], alias: str) -> SFTRecord:
        self.check_writable("untag SFTs")
        record = self._registered(ref)
        with self.db.session(write=True) as session:
            row = self._row_by_id(session, record)
            if alias not in {tag.name for tag in row.tags}:
                tags = ", ".join(record.tags) or "none"
                raise NotFoundError(f"{row.reference} has no tag {alias!r} (its tags: {tags})")
            session.execute(delete(TagRow).where(TagRow.sft_id == row.id, TagRow.name == alias))
            session.refresh(row)
            return self._record(row)

    def remove(self, ref: SFTRecord | str | os.PathLike[str], force: bool = False) -> SFTRecord:
        """Delete a version and its artifact. Refused while another SFT names it as its source,
        unless ``force`` (those keep the source's reference as text but lose the link).

        The row goes first, in its own transaction; the files then go under the artifact's lock, so a
        kill in between leaves only unreferenced files (``gc``) and never a row without its artifact.
        """
        self.check_writable("remove SFTs")
        record = self._registered(ref)
        store = self.store
        with self.db.session(write=True) as session, _artifact_lock(session, record.sha256):
            self._settle_location(session, store)
            row = self._row_by_id(session, record)
            children = _children(session, row.id)
            if children and not force:
                names = ", ".join(child.reference for child in children)
                raise BadInputError(
                    f"{row.reference} is the source of {names}: remove those first, or force it (`--force`)"
                )
            for child in children:
                if child.source_id == row.id:
                    child.source_id = None
            for link in session.scalars(select(SourceRow).where(SourceRow.source_id == row.id)):
                link.source_id = None  # its reference stays as text
            removed = self._record(row)
            session.delete(row)
        self._collect(store, removed.sha256, written_before=None)
        self.cache.evict(removed.sha256)  # a remote artifact's copy on this machine
        return removed

    def _collect(self, store: ArtifactStore, sha256: str, written_before: float | None) -> bool:
        """Delete an artifact's files unless a row references it, holding its lock; True if deleted.

        ``written_before`` (gc) also keeps files written since then: an upload still in flight.
        """
        with self.db.session(write=True) as session, _artifact_lock(session, sha256):
            if session.scalar(select(SFTRow.id).where(SFTRow.sha256 == sha256)) is not None:
                return False  # referenced again: an add of the same content committed meanwhile
            if written_before is not None:
                files = store.files(sha256)
                if any(stored.modified > written_before for stored in files.values()):
                    return False
            store.delete(sha256)
        return True

    @staticmethod
    def _row_by_id(session: Session, record: SFTRecord) -> SFTRow:
        row = session.get(SFTRow, record.id)
        if row is None:
            raise NotFoundError(f"{record.reference} was removed meanwhile")
        return row

    # ------------------------------------------------------------------ maintenance
    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[VerifyProblem]:
        """Re-hash every artifact where it is kept (downloading remote ones); returns what is missing,
        incomplete or changed (empty = all good)."""
        self._ready()
        store = self.store
        with self.db.session() as session:
            rows = session.execute(
                select(SFTRow.kind, SFTRow.language, SFTRow.task, SFTRow.version, SFTRow.sha256).order_by(SFTRow.id)
            ).all()
        problems = []
        for done, row in enumerate(rows, 1):
            reference = canonical_reference(row.kind, sft_name(row.kind, row.language, row.task), row.version)
            files = store.files(row.sha256)
            missing = [name for name in REQUIRED_FILES if name not in files]
            problem = None
            if not files:
                problem = "artifact missing"
            elif missing:
                problem = f"incomplete: {', '.join(missing)} missing"
            elif store.hash(row.sha256) != row.sha256:
                problem = "content does not match its sha256"
            if problem is not None:
                problems.append(VerifyProblem(reference, row.sha256, store.address(row.sha256), problem))
            if progress is not None:
                progress(done, len(rows))
        return problems

    def gc(self, grace_seconds: float = DEFAULT_GRACE_S) -> list[str]:
        """Delete artifacts no row references, and files left by interrupted uploads, that are older than
        ``grace_seconds`` (younger ones may belong to an add still uploading); returns what went."""
        self.check_writable("collect garbage")
        store = self.store
        with self.db.session(write=True) as session:
            self._settle_location(session, store)
        cutoff = time.time() - grace_seconds
        artifacts, temporary = store.inventory()
        with self.db.session() as session:
            referenced = set(session.scalars(select(SFTRow.sha256)))
        removed = [
            store.address(sha256)
            for sha256, newest in sorted(artifacts.items())
            if sha256 not in referenced and newest <= cutoff and self._collect(store, sha256, written_before=cutoff)
        ]
        for key, modified in temporary:
            sha256 = key.rsplit("/", 2)[-2]
            if sha256 in referenced and modified <= cutoff:  # an unreferenced one went with its artifact
                store.delete_file(key)
                removed.append(key)
        return removed + store.remove_legacy()

    def upgrade(self) -> tuple[str | None, str | None]:
        """Migrate the database schema to what this sftkit needs; returns (before, after) revisions."""
        if self.readonly:
            raise BadInputError(f"the registry home {self.home} is read-only: cannot upgrade its database")
        result = self.db.upgrade()
        self._schema_checked = True
        return result

    def status(self) -> dict[str, Any]:
        """Where the registry lives and whether its schema is current (never migrates)."""
        revision = self.db.revision()
        store = self.store if revision == HEAD else None
        return {
            "url": self.url,
            "artifacts": store.url if store is not None else None,
            "cache": str(self.cache.root),
            "revision": revision,
            "head": HEAD,
            "up_to_date": revision == HEAD,
            "readonly": self.readonly,
        }


@contextlib.contextmanager
def _local_directory(sft_or_dir: SparseFineTuning | str | os.PathLike[str]) -> Iterator[Path]:
    """The SFT as a local directory: the user's own, or the object saved into a private temporary one."""
    if isinstance(sft_or_dir, (str, os.PathLike)):
        yield Path(sft_or_dir).expanduser()
        return
    with tempfile.TemporaryDirectory(prefix="sftkit-add-") as scratch:
        yield sft_or_dir.save(Path(scratch) / "sft")


def _same_sizes(store: ArtifactStore, sha256: str, sizes: dict[str, int]) -> bool:
    """Whether the location holds exactly these files with these sizes (each file there is whole)."""
    return {name: stored.size for name, stored in store.files(sha256).items()} == sizes


@contextlib.contextmanager
def _artifact_lock(session: Session, sha256: str) -> Iterator[None]:
    """Serialise, across hosts, the transactions that make rows point, or stop pointing, at one artifact.

    The row is inserted and deleted again before the transaction commits: it is never seen, but its key
    makes every other transaction inserting it wait until this one ends (PostgreSQL: the unique index;
    SQLite: one writer at a time anyway). A killed process's transaction is rolled back, lock and all.
    """
    session.add(ArtifactLockRow(sha256=sha256))
    session.flush()
    yield
    session.execute(delete(ArtifactLockRow).where(ArtifactLockRow.sha256 == sha256))


def _series_for_update(session: Session, kind: str, name: str, base_model: str) -> SeriesRow:
    """The series row, locked for this transaction (created when new)."""
    query = select(SeriesRow).where(SeriesRow.kind == kind, SeriesRow.name == name, SeriesRow.base_model == base_model)
    series = session.scalar(query.with_for_update())
    if series is None:
        series = SeriesRow(kind=kind, name=name, base_model=base_model, last_version=0)
        session.add(series)
        session.flush()
    return series


def _optional(config: dict[str, Any], key: str, kind: type) -> Any:
    value = config.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"sft_config.json: {key} = {value!r} is not a {kind.__name__}") from exc


def _mapping(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise BadInputError(f"sft_config.json: {key} must be a mapping, not {type(value).__name__}")
    return value


def _row_fields(info: ArtifactInfo) -> dict[str, Any]:
    """Row columns from an artifact's config; entry counts come from the weights themselves."""
    config = info.config
    kind = config["kind"]
    name = check_name(sft_name(kind, config.get("language"), config.get("task")), kind)
    if config.get("language") is not None:
        check_name(config["language"], "language")
    counts = info.weights.parameters
    size = sum(count.size for count in counts)
    density = _optional(config, "density", float)
    return {
        "kind": kind,
        "name": name,
        "language": config.get("language"),
        "task": config.get("task") if kind == "task" else None,
        "base_model": str(config.get("base_model") or UNKNOWN_BASE),
        "base_revision": _optional(config, "base_revision", str),
        "base_fingerprint": _optional(config, "base_fingerprint", str),
        "method": _optional(config, "method", str),
        "rank": _optional(config, "rank", str),
        "keep": _optional(config, "keep", float),
        "k": _optional(config, "k", int),
        "density": density if density is not None else (info.weights.num_entries / size if size else None),
        "num_entries": info.weights.num_entries,
        "metrics": _mapping(config, "metrics"),
        "trainer": _mapping(config, "trainer"),
    }


def _row_by_lineage(session: Session, lineage: dict[str, Any]) -> SFTRow | None:
    """The registered SFT a lineage record names by its sha256, if any."""
    sha = str(lineage.get("sha256") or "").removeprefix("sha256:")
    return session.scalar(select(SFTRow).where(SFTRow.sha256 == sha)) if sha else None


def _check_same_base(source: SFTRow, fields: dict[str, Any]) -> None:
    ours, theirs = fields["base_fingerprint"], source.base_fingerprint
    if ours and theirs and ours != theirs:
        raise BaseMismatchError(
            f"the source SFT {source.reference} was trained on another base model ({source.base_model or theirs}) "
            f"than this SFT ({fields['base_model'] or ours})"
        )


def _children(session: Session, sft_id: int | None) -> list[SFTRow]:
    """SFTs trained on top of ``sft_id``: through ``source_id`` or as one of several sources."""
    linked = select(SourceRow.sft_id).where(SourceRow.source_id == sft_id)
    query = select(SFTRow).where((SFTRow.source_id == sft_id) | SFTRow.id.in_(linked)).order_by(SFTRow.id)
    return list(session.scalars(query))
