"""Moving a registry: its artifacts to another location (``sftkit db migrate-artifacts --to URL``), its rows
to another database (``sftkit db migrate-rows --to URL``), so a laptop's registry becomes a team's.

Every artifact is copied and verified by its sha256 where it lands before the registry records the new
location, so a kill at any point leaves the registry on the old location with complete copies (or
nothing) at the new one; running again keeps the copies that verify and copies the rest. The switch is
one transaction that holds the location record exclusively: adds hold it shared while their row commits,
so each add either finished on the old location (and is copied here before the switch) or sees the new
one and uploads there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, select, text

from sftkit.errors import BadInputError
from sftkit.registry.core import Registry
from sftkit.registry.database import Database
from sftkit.registry.location import ARTIFACT_URL_KEY
from sftkit.registry.objects import ArtifactStore
from sftkit.registry.schema import Base, InfoRow, SeriesRow, SFTRow

_SWITCH_ATTEMPTS = 5


@dataclass(frozen=True)
class Relocation:
    source: str
    target: str
    copied: int
    present: int


def migrate_artifacts(registry: Registry, to: str, progress: Callable[[int, int], None] | None = None) -> Relocation:
    """Copy every artifact to ``to`` (verified, resumable), then switch the registry to it."""
    registry.check_writable("move its artifacts")
    source = registry.store
    target = ArtifactStore(to, progress=source.progress)
    if target.url == source.url:
        raise BadInputError(f"the registry's artifacts are already at {target.url}")
    target.ensure_reachable(write=True)
    with registry.db.session() as session:
        target.claim(session.get_one(InfoRow, "registry_id").value)
    copied, present, done = 0, 0, set[str]()
    for _ in range(_SWITCH_ATTEMPTS):
        with registry.db.session() as session:
            rows = session.execute(select(SFTRow.sha256, SFTRow.id).order_by(SFTRow.id)).all()
        for row in [row for row in rows if row.sha256 not in done]:
            if target.hash(row.sha256) == row.sha256:
                present += 1
            else:
                record = registry.resolve(f"sha256:{row.sha256}")
                target.upload(registry.local_copy(record), row.sha256)  # verified where it lands
                copied += 1
            done.add(row.sha256)
            if progress is not None:
                progress(len(done), len(rows))
        with registry.db.session(write=True) as session:
            recorded = session.scalar(select(InfoRow).where(InfoRow.key == ARTIFACT_URL_KEY).with_for_update())
            added_meanwhile = set(session.scalars(select(SFTRow.sha256))) - done
            if added_meanwhile:
                continue  # nothing changed: copy those too, then try the switch again
            if recorded is None:
                session.add(InfoRow(key=ARTIFACT_URL_KEY, value=target.url))
            else:
                recorded.value = target.url
        registry.use_location(target.url)
        return Relocation(source.url, target.url, copied, present)
    raise BadInputError("SFTs kept being added while moving the artifacts: run it again when the registry is quieter")


def migrate_rows(registry: Registry, to: str) -> int:
    """Copy every row into the empty database ``to``: ids, versions, tags, lineage and the registry's id and
    artifact location all kept, so the artifacts need no move and every reference still names the same SFT.

    Returns the number of SFTs copied. The source database is left as it was.
    """
    location = registry.store.url  # the recorded one, or this machine's store: the copy records it either way
    target = Database(to)
    target.check_schema()  # creates it in an empty database
    copied = [table for table in Base.metadata.sorted_tables if table.name not in {"registry_info", "artifact_locks"}]
    with registry.db.session() as source, target.session(write=True) as session:
        if session.scalar(select(func.count()).select_from(SeriesRow)):
            raise BadInputError(f"{target.display_url} already holds a registry with SFTs: give an empty database")
        for table in copied:  # parents first; within sfts, id order puts every source before its dependents
            rows = [dict(row) for row in source.execute(select(table).order_by(*table.primary_key)).mappings()]
            if rows:
                session.execute(insert(table), rows)
        info = {row.key: row.value for row in source.scalars(select(InfoRow))}
        info.setdefault(ARTIFACT_URL_KEY, location)
        for key, value in info.items():
            session.merge(InfoRow(key=key, value=value))
        if target.engine.dialect.name == "postgresql":  # explicit ids leave the serial sequences behind
            for table in copied:
                if "id" in table.c and table.c.id.primary_key:
                    sequence, name = f"pg_get_serial_sequence('{table.name}', 'id')", table.name
                    session.execute(text(f"SELECT setval({sequence}, COALESCE(MAX(id), 0) + 1, false) FROM {name}"))
        count = session.scalar(select(func.count()).select_from(SFTRow))
    target.dispose()
    return count
