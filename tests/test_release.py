"""Release hygiene: one version source, a changelog entry for it, a README that PyPI renders, and
(when ``AICHATONLINE_DIST_DIR`` names a folder with the built sdist and wheel, as ``.ci/run`` does)
distributions that hold what they must."""

from __future__ import annotations

import configparser
import email.parser
import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

import aichatonline_sync as aco

ROOT = Path(__file__).resolve().parent.parent
DIST_DIR = os.environ.get("AICHATONLINE_DIST_DIR")
NAME = "aichatonline_sync"


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def test_one_version_source() -> None:
    assert (
        setup_cfg()["metadata"]["version"].strip() == "attr: aichatonline_sync._version.__version__"
    )
    source = (ROOT / NAME / "_version.py").read_text(encoding="utf-8")
    assert re.fullmatch(r'__version__ = "\d+\.\d+\.\d+((a|b|rc)\d+)?"\n', source), source
    assert f'"{aco.__version__}"' in source
    others = [
        path.name
        for path in (ROOT / NAME).glob("*.py")
        if path.name != "_version.py"
        and re.search(r"^__version__\s*=", path.read_text("utf-8"), re.M)
    ]
    assert others == [], "the version is set in _version.py only"


def test_changelog_has_an_entry_for_this_version() -> None:
    text = (ROOT / "CHANGES.rst").read_text(encoding="utf-8")
    entries = re.findall(r"^(\d+\.\d+\.\d+\S*)(?: \(.*\))?\n-+\n", text, re.M)
    assert entries, "CHANGES.rst has no version entry"
    assert entries[0] == aco.__version__, "the newest CHANGES.rst entry is not the package version"


def test_long_description_is_the_readme() -> None:
    metadata = setup_cfg()["metadata"]
    assert metadata["long_description"].strip() == "file: README.rst"
    assert metadata["long_description_content_type"].strip() == "text/x-rst"


def test_pypi_renders_the_readme_and_the_changelog() -> None:
    rst = pytest.importorskip("readme_renderer.rst")  # what `twine check` and PyPI use
    for name in ("README.rst", "CHANGES.rst"):
        warnings = io.StringIO()
        html = rst.render((ROOT / name).read_text(encoding="utf-8"), stream=warnings)
        assert html is not None, f"{name} does not render on PyPI:\n{warnings.getvalue()}"


def test_manifest_ships_docs_types_tests_and_examples() -> None:
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8")
    for line in (
        "include README.rst CHANGES.rst MANIFEST.in",
        "include aichatonline_sync/py.typed",
        "recursive-include tests *.py",
        "recursive-include examples *.ipynb",
        "recursive-include docs *.rst *.py *.conf *.service",
    ):
        assert line in manifest.splitlines()


# --- the built distributions (.ci/run builds them and sets AICHATONLINE_DIST_DIR) -------------

needs_dist = pytest.mark.skipif(
    not DIST_DIR, reason="set AICHATONLINE_DIST_DIR to a folder with the built sdist and wheel"
)


def only(pattern: str) -> Path:
    assert DIST_DIR is not None
    found = sorted(Path(DIST_DIR).glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {DIST_DIR}, found {found}"
    return found[0]


@needs_dist
def test_sdist_contents() -> None:
    sdist = only(f"{NAME}-{aco.__version__}.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {
        "README.rst",
        "CHANGES.rst",
        "setup.cfg",
        "pyproject.toml",
        "PKG-INFO",
        f"{NAME}/py.typed",
        f"{NAME}/_version.py",
        f"{NAME}/testing/__init__.py",
        f"{NAME}/testing/emulator.py",
        f"{NAME}/_client/session.py",
        "tests/conftest.py",
        "tests/test_readme.py",
        "examples/quickstart.ipynb",
        "docs/conf.py",  # the manual (tests/test_readme.py runs its examples)
        "docs/index.rst",
        "docs/sessions.rst",
        "docs/api.rst",
        "docs/deploy/nginx.conf",  # (tests/test_deploy_nginx.py runs it)
        "docs/deploy/aichatonline-gateway.service",
    }
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n]
    assert not [n for n in names if n.startswith("docs/_build/")]


@needs_dist
def test_wheel_contents_and_metadata() -> None:
    wheel = only(f"{NAME}-{aco.__version__}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"{NAME}-{aco.__version__}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert f"{NAME}/py.typed" in names
    # Every module of every layer's folder, __init__.py included (a folder left out of
    # packages= would install without its modules).
    source = Path(aco.__file__).parent
    modules = {f"{NAME}/{path.relative_to(source).as_posix()}" for path in source.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    assert metadata["Name"] == "aichatonline-sync"
    assert metadata["Version"] == aco.__version__
    assert metadata["Requires-Python"] == ">=3.9"
    assert metadata["Description-Content-Type"] == "text/x-rst"
    requires = metadata.get_all("Requires-Dist") or []
    assert any(r.startswith("requests") for r in requires)
    assert any(r.startswith("ipython") and 'extra == "notebook"' in r for r in requires), requires
    assert "aichatonline = aichatonline_sync.cli:main" in entry_points
    assert "aichatonline_sync = aichatonline_sync.testing.pytest_plugin" in entry_points
