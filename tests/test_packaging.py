"""The wheel installs one namespace, ``sftkit``, and works from outside the repository.

pyproject's ``package-dir`` maps the repository's folders ``sftkit/``, ``registry/`` and ``cli/`` to ``sftkit``,
``sftkit.registry`` and ``sftkit.cli``. These tests build a real wheel and install it into a throwaway virtual
environment, so a package missing from pyproject's explicit ``packages`` list, a lost data file or an import of
the folders' old top-level names (``import registry``) fails here, not on a user's machine.

Cheap by construction: the wheel is built from a copy of the sources (an in-tree build would write into the
repository's ``build/`` and ship whatever stale files an older layout left in ``build/lib``) with the test
environment's setuptools (no build isolation) when it is recent enough, and the fresh environment gets the
wheel with ``--no-deps``; its dependencies come from the test environment through a ``.pth`` file.
"""

from __future__ import annotations

import ast
import configparser
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed package name -> repository folder (pyproject.toml [tool.setuptools] package-dir).
PACKAGE_DIRS = {"sftkit": "sftkit", "sftkit.registry": "registry", "sftkit.cli": "cli"}
MAKO = "sftkit/registry/migrations/script.py.mako"
LEGACY_TOP_LEVEL = {"cli", "registry"}
PIP = ["--disable-pip-version-check", "--no-input", "-q"]


def _version(distribution: str) -> tuple[int, ...]:
    try:
        text = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return ()
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that would put other code on the path."""
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(PIP_NO_INPUT="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _repository_python_files() -> list[str]:
    """Every module of the repository's folders, under the path it must have in the wheel."""
    files = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append("/".join([*package.split("."), *path.relative_to(ROOT / folder).parts]))
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    for path in ROOT.iterdir():
        if path.is_file() and (path.name in {"pyproject.toml", "README.md"} or path.name.startswith("LICEN")):
            shutil.copy2(path, source / path.name)

    command = [sys.executable, "-m", "pip", "wheel", *PIP, "--no-deps", "-w", str(work / "dist")]
    if _version("setuptools") >= (68,):  # pyproject's build requirement, already here: no download, no isolation
        command += ["--no-build-isolation", "--no-index"]
    _run([*command, str(source)], cwd=work, env=_clean_env())
    (built,) = (work / "dist").glob("sftkit-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_one_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (dist_info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        record = archive.read(f"{dist_info}/RECORD").decode()
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())

    roots = {name.split("/")[0] for name in names}
    assert not roots & LEGACY_TOP_LEVEL, f"the wheel installs generic top-level names: {sorted(roots)}"
    assert roots == {"sftkit", dist_info}, sorted(roots)
    assert top_level == ["sftkit"]
    recorded = {row[0] for row in csv.reader(io.StringIO(record)) if row}
    assert recorded == set(names), sorted(recorded ^ set(names))
    assert entry_points["console_scripts"]["sftkit"].strip() == "sftkit.cli.main:main"

    assert MAKO in names, "registry/migrations/script.py.mako is missing (package-data)"
    missing = [path for path in _repository_python_files() if path not in names]
    assert not missing, f"modules missing from the wheel (a package not listed in pyproject?): {missing}"


@pytest.mark.slow
def test_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    environment = tmp_path / "venv"
    if _version("pip") >= (22, 3):  # pip --python: install into a pip-less venv, the fast way
        venv.EnvBuilder(with_pip=False).create(environment)
        python = environment / ("Scripts" if os.name == "nt" else "bin") / Path(sys.executable).name
        python = python if python.exists() else python.with_name("python")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                *PIP,
                "--no-deps",
                "--no-index",
                str(wheel),
            ]
        )
    else:
        venv.EnvBuilder(with_pip=True).create(environment)
        python = environment / ("Scripts" if os.name == "nt" else "bin") / "python"
        _run([str(python), "-m", "pip", "install", *PIP, "--no-deps", "--no-index", str(wheel)])
    bin_dir = python.parent
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )

    # Files the wheel put at the top of site-packages: only the package and its metadata.
    installed = sorted(path.name for path in site_packages.iterdir() if path.name != "__pycache__")
    assert not {Path(name).stem for name in installed} & LEGACY_TOP_LEVEL, installed
    assert [name for name in installed if not name.startswith("_")] == [
        "sftkit",
        wheel.name.split("-py")[0] + ".dist-info",
    ]
    assert (site_packages / MAKO).is_file()

    # The dependencies (torch, typer, sqlalchemy, ...) come from the test environment's site directories only:
    # not the repository (an older-style editable install puts it on sys.path), not the tests' own folders.
    # Listed after the venv's own site-packages, so the wheel's sftkit wins over the test environment's.
    site_dirs = ("site-packages", "dist-packages")
    dependencies = [entry for entry in dict.fromkeys(sys.path) if entry.endswith(site_dirs) and Path(entry).is_dir()]
    (site_packages / "_sftkit_test_dependencies.pth").write_text("\n".join(dependencies) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", SFTKIT_HOME=str(tmp_path / "home"))
    env.pop("SFTKIT_REGISTRY_URL", None)
    script = shutil.which("sftkit", path=str(bin_dir))
    assert script, f"no sftkit console script in {bin_dir}"

    helped = _run([script, "--help"], cwd=elsewhere, env=env)
    assert "Usage" in helped.stdout and "sftkit" in helped.stdout

    probe = """
import importlib.resources, json, sftkit, sftkit.registry, sftkit.cli.main
print(json.dumps({
    "files": [sftkit.__file__, sftkit.registry.__file__, sftkit.cli.main.__file__],
    "mako": importlib.resources.files("sftkit.registry.migrations").joinpath("script.py.mako").is_file(),
}))
"""
    found = json.loads(_run([str(python), "-c", probe], cwd=elsewhere, env=env).stdout)
    for file in found["files"]:
        assert Path(file).resolve().is_relative_to(site_packages.resolve()), f"imported {file}, not the wheel's copy"
    assert found["mako"]

    # The migrations ship as code: a fresh registry database is created and migrated to head from the wheel.
    _run([script, "db", "upgrade"], cwd=elsewhere, env=env)
    status = json.loads(_run([script, "db", "status", "--json"], cwd=elsewhere, env=env).stdout)
    assert status["up_to_date"] is True, status


def test_the_bases_extra_installs_what_benchmarks_bases_imports():
    """``pip install -e '.[bases]'`` (the README's line next to bases.py) is all bases.py needs beyond sftkit."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    tree = ast.parse((ROOT / "benchmarks" / "bases.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    distributions = metadata.packages_distributions()
    imported = {dist.lower() for module in modules for dist in distributions.get(module.split(".")[0], [])}
    # sentencepiece_model_pb2 imports google.protobuf, which the scan of bases.py itself cannot see.
    needed = (imported - names(project["dependencies"])) | {"protobuf"}
    assert needed == names(extras["bases"])
    assert names(extras["bases"]) <= names(extras["dev"])
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"pip install -e \"\.\[bases\]\".*\n.*benchmarks/bases\.py", readme)
