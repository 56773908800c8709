"""pyproject.toml and constraints.txt: build metadata setuptools keeps supporting, and one pinned release of
every dependency, installed the same way by `make install`, CI and the image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = ("dev", "embedded", "local")


def pins() -> dict[str, str]:
    """constraints.txt as name -> version."""
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and ";" not in version, f"not an exact pin: {line!r}"
            found[canonicalize_name(name)] = version
    return found


def test_license_is_an_spdx_string_and_setuptools_supports_it() -> None:
    # A TOML table (`{text = ...}`) is deprecated: setuptools stops supporting it after 2027-02-18.
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    (requirement,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert requirement.name == "setuptools"
    assert "76.9" not in requirement.specifier and "77.0" in requirement.specifier


def test_every_dependency_of_every_extra_is_pinned_within_its_range() -> None:
    pinned = pins()
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    assert set(project["optional-dependencies"]) == set(EXTRAS)
    for extra in EXTRAS:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not in constraints.txt: run `make lock`"
        assert SpecifierSet(str(requirement.specifier)).contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}: run `make lock`"
        )
    assert canonicalize_name(project["name"]) not in pinned  # the project itself is installed from source


def test_install_ci_and_image_use_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    install = re.search(r"^\$\(STAMP\): (.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert install is not None
    assert "$(CONSTRAINTS)" in install.group(1)  # a new lock reinstalls
    assert "pip install --quiet -c $(CONSTRAINTS) -e '.[dev,embedded,local]'" in install.group(2)
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.MULTILINE)
    lock = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert lock is not None and "uv pip compile pyproject.toml" in lock.group(1)
    for extra in EXTRAS:
        assert f"--extra {extra}" in lock.group(1)
    assert "--python-version 3.11" in lock.group(1) and "x86_64" in lock.group(1)
    assert "make install" in (ROOT / ".ci" / "run").read_text()
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.MULTILINE)
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and "--no-deps" not in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
