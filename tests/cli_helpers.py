"""Assertions shared by the command-line tests."""

from __future__ import annotations


def one_line_error(result) -> str:
    """A bad-input failure: exit code 2 and exactly one line on stderr, which is returned."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
