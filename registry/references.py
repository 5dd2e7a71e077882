"""The reference grammar shared by every command: names, versions, aliases, content hashes, paths.

ace | sa                      newest version of the language or task of that name
lang:ace | task:nli           the same, kind made explicit (also ``language:``)
lang:ace@3 | ace@latest       a version (``latest`` = newest)
ace@best                      the version carrying the alias ``best``
sha256:1a2b3c4d               a content hash prefix (at least 6 hex digits), unique across bases
./runs/ace | /abs/dir | ~/x   an SFT directory (anything with a path separator or a leading . or ~)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sftkit.errors import BadInputError

KIND_ALIASES = {"lang": "language", "language": "language", "task": "task"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
TAG_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
LATEST = "latest"
_SHA_PATTERN = re.compile(r"sha256:([0-9a-f]{6,64})")
_REFERENCE_PATTERN = re.compile(r"(?:(?P<kind>[a-z]+):)?(?P<name>[^:@\s]+)(?:@(?P<selector>[^:@\s]+))?")


@dataclass(frozen=True)
class ParsedReference:
    """A registry reference taken apart; ``version``/``alias`` are None for "newest"."""

    kind: str | None = None
    name: str | None = None
    version: int | None = None
    alias: str | None = None
    sha_prefix: str | None = None

    @property
    def selector(self) -> str:
        if self.version is not None:
            return f"@{self.version}"
        return f"@{self.alias}" if self.alias else ""


def looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith((".", "~"))


def check_name(name: str | None, what: str) -> str:
    """Language codes and task names end up in references, so they must fit the grammar."""
    if not name or not NAME_PATTERN.fullmatch(name):
        raise BadInputError(
            f"{what} {name!r} is not a valid name: use letters, digits and _ . + - (e.g. 'ace', 'zh-Hans', 'nli')"
        )
    return name


def check_tag(tag: str) -> str:
    if not TAG_PATTERN.fullmatch(tag or "") or tag == LATEST:
        raise BadInputError(
            f"{tag!r} is not a valid tag: start with a letter, then letters, digits, _ . - "
            f"(not a number and not {LATEST!r}, which select versions)"
        )
    return tag


def parse_reference(text: str) -> ParsedReference:
    """Parse a registry reference (not a path); raises ``BadInputError`` saying what is accepted."""
    text = text.strip()
    sha = _SHA_PATTERN.fullmatch(text.lower())
    if sha:
        return ParsedReference(sha_prefix=sha.group(1))
    match = _REFERENCE_PATTERN.fullmatch(text)
    kind = KIND_ALIASES.get(match.group("kind")) if match and match.group("kind") else None
    if not match or (match.group("kind") and kind is None) or not NAME_PATTERN.fullmatch(match.group("name")):
        raise BadInputError(
            f"{text!r} is not a valid SFT reference: use e.g. 'ace', 'lang:ace', 'task:nli', 'lang:ace@3', "
            "'ace@best', 'sha256:1a2b3c', or a path to an SFT directory"
        )
    selector = match.group("selector")
    if selector is None or selector == LATEST:
        return ParsedReference(kind=kind, name=match.group("name"))
    if selector.isdigit():
        return ParsedReference(kind=kind, name=match.group("name"), version=int(selector))
    return ParsedReference(kind=kind, name=match.group("name"), alias=check_tag(selector))
