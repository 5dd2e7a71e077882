"""``sftkit.atomic``: a directory appears complete or not at all, and is replaced only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftkit.atomic import atomic_directory, check_target
from sftkit.errors import BadInputError


class Boom(Exception):
    pass


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) with its text, by relative path."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_artifact(directory: Path, tag: str) -> None:
    (directory / "weights.bin").write_text(f"weights {tag}")
    (directory / "sub").mkdir()
    (directory / "sub" / "config.json").write_text(f'{{"tag": "{tag}"}}')


def test_success_moves_the_staged_files_into_place_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path
        assert staging.name.startswith(".out.partial-")
        assert not target.exists()  # nothing visible while the block writes
        _write_artifact(staging, "new")
    assert _tree(target) == {"weights.bin": "weights new", "sub/config.json": '{"tag": "new"}'}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_parents_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_directory(str(target)) as staging:  # a str target works too
        (staging / "f").write_text("x")
    assert _tree(target) == {"f": "x"}


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt, SystemExit])
def test_an_exception_leaves_no_target_and_no_staging_directory(tmp_path, error):
    target = tmp_path / "out"
    with pytest.raises(error), atomic_directory(target) as staging:
        _write_artifact(staging, "half")
        raise error()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_exception_keeps_the_previous_directory_untouched(tmp_path, overwrite):
    target = tmp_path / "out"
    target.mkdir()
    _write_artifact(target, "old")
    if not overwrite:
        with pytest.raises(BadInputError, match="already exists"), atomic_directory(target):
            pytest.fail("the block must not run when the target is occupied")
    else:
        with pytest.raises(Boom), atomic_directory(target, overwrite=True) as staging:
            _write_artifact(staging, "half")
            (staging / "extra").write_text("x")
            raise Boom()
    assert _tree(target) == {"weights.bin": "weights old", "sub/config.json": '{"tag": "old"}'}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _write_artifact(target, "old")
    (target / "stale.txt").write_text("from the old artifact")
    with atomic_directory(target, overwrite=True) as staging:
        assert _tree(target)["weights.bin"] == "weights old"  # the old one stays readable until the swap
        _write_artifact(staging, "new")
    assert _tree(target) == {"weights.bin": "weights new", "sub/config.json": '{"tag": "new"}'}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the retired copy is deleted


def test_an_empty_directory_is_not_occupied(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    check_target(target, overwrite=False)
    with atomic_directory(target) as staging:
        (staging / "f").write_text("x")
    assert _tree(target) == {"f": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_file_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(BadInputError, match="already exists"):
        check_target(target, overwrite=False)
    with pytest.raises(BadInputError, match="--force"), atomic_directory(target):
        pytest.fail("the block must not run")
    assert target.read_text() == "a file"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_target_contract(tmp_path):
    check_target(tmp_path / "missing", overwrite=False)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / ".hidden").write_text("x")  # hidden files count
    with pytest.raises(BadInputError):
        check_target(occupied, overwrite=False)
    check_target(occupied, overwrite=True)
    assert isinstance(BadInputError("x"), ValueError)  # the CLI maps it to exit code 2


def test_overwriting_a_file_with_a_directory(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "f").write_text("x")
    assert target.is_dir()
    assert _tree(target) == {"f": "x"}


def test_overwriting_a_file_leaves_no_retired_copy(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "f").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_stagings_for_the_same_target_do_not_collide(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, overwrite=True) as first, atomic_directory(target, overwrite=True) as second:
        assert first != second
        (first / "who").write_text("first")
        (second / "who").write_text("second")
    # The outer block finishes last, so its content wins; neither staging directory is left behind.
    assert _tree(target) == {"who": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_target_created_during_the_block_is_not_replaced_without_overwrite(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(BadInputError), atomic_directory(target) as staging:
        (staging / "f").write_text("ours")
        target.mkdir()
        (target / "f").write_text("someone else's")
    assert _tree(target) == {"f": "someone else's"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
