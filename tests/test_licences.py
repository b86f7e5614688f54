"""Licences: the package declares its own (PEP 639, with a build backend that supports it), and the image
ships the licence texts and a NOTICE naming every bundled copyleft component.

"Bundled" is read from the installed runtime dependency closure of tts-streamer (what scripts/install.sh
puts into the image's /opt/venv, without the dev extra): each distribution's declared licence, and the
``Files:`` / ``License:`` sections of its licence files (how numpy declares the GCC runtime libraries
its wheel carries). A new copyleft dependency therefore fails here until NOTICE names it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import attrs
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.test_packaging import (
    DOCKERFILE,
    ROOT,
    _in_stage,
    _is_included,
    _stages,
    _strip_flags,
    parse_dockerfile,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOTICE = ROOT / "NOTICE"
IMAGE_LICENSE_DIR = "/usr/share/licenses/tts-streamer/"
# sha256 of the canonical texts (apache.org LICENSE-2.0.txt, gnu.org gpl-3.0.txt; Debian ships the same
# bytes in /usr/share/common-licenses, where these copies come from).
CANONICAL = {
    "LICENSE": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    "licenses/GPL-3.0.txt": "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986",
}
SPDX_SKIP = "packaging >= 24.2 validates SPDX expressions"
COPYLEFT = re.compile(r"\b(A?GPL|LGPL|MPL|EPL|EUPL|CDDL|OSL|CECILL)\b|GNU|Mozilla Public|Eclipse Public")
# Distributions that declare no licence at all, reviewed by hand: what they bundle, under which licence.
UNDECLARED = {
    "espeakng-loader": ("espeak-ng", "GPL-3.0-or-later"),  # vendors.md §7: the wheel carries libespeak-ng
}


@attrs.frozen
class Bundled:
    component: str
    licence: str
    via: str


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions() -> dict[str, md.Distribution]:
    """tts-streamer and everything it requires at run time, as installed here."""
    found: dict[str, md.Distribution] = {}
    pending = ["tts-streamer"]
    while pending:
        name = pending.pop()
        if _key(name) in found:
            continue
        dist = md.distribution(name)
        found[_key(name)] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def _declared(dist: md.Distribution) -> list[str]:
    meta = dist.metadata.json
    classifiers = [str(c) for c in meta.get("classifier", []) if str(c).startswith("License ::")]
    fields = [meta.get("license_expression"), meta.get("license")]
    return [str(text) for text in fields if text] + classifiers


def bundled_copyleft() -> list[Bundled]:
    found: list[Bundled] = []
    for key, dist in sorted(runtime_distributions().items()):
        if key == "tts-streamer":
            continue
        declared = _declared(dist)
        if not declared:
            assert key in UNDECLARED, (
                f"{key} declares no licence: review what it bundles, add it to UNDECLARED"
            )
            found.append(Bundled(*UNDECLARED[key], via=key))
            continue
        if any(COPYLEFT.search(text) for text in declared):
            expression = str(dist.metadata.json.get("license_expression") or "; ".join(declared))
            found.append(Bundled(key, expression, via=key))
        for path in dist.files or []:
            if not re.search(r"licen[cs]e|copying", str(path), re.IGNORECASE):
                continue
            text = Path(str(dist.locate_file(path))).read_text(errors="replace")
            for files, licence in re.findall(
                r"^Files:\s*(\S+)\s*\n(?:.*\n){0,4}?License:\s*(.+)$", text, re.M
            ):
                if COPYLEFT.search(licence):
                    component = re.split(r"[*.\-]", files.rsplit("/", 1)[-1])[0]
                    found.append(Bundled(component, licence.strip(), via=key))
    return found


def test_pyproject_declares_an_spdx_licence_with_its_files() -> None:
    licenses = pytest.importorskip(
        "packaging.licenses", reason="packaging >= 24.2 validates SPDX expressions"
    )
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str), "the SPDX string form; the table form stops building in 2027"
    assert licenses.canonicalize_license_expression(project["license"]) == project["license"] == "Apache-2.0"
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")], "PEP 639: no both"
    for pattern in project["license-files"]:
        assert list(ROOT.glob(pattern)), f"license-files entry {pattern!r} matches nothing"
    assert "LICENSE" in project["license-files"]


def test_build_backend_is_bounded_to_releases_with_pep_639() -> None:
    build = PYPROJECT["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    (setuptools,) = [Requirement(r) for r in build["requires"] if Requirement(r).name == "setuptools"]
    spec: SpecifierSet = setuptools.specifier
    assert not spec.contains("76.1.0"), "PEP 639 licence expressions need setuptools >= 77"
    assert spec.contains("77.0.3") and spec.contains("84.2.1")
    assert any(s.operator in {"<", "<=", "~=", "=="} for s in spec), "an upper bound"
    assert not spec.contains("1000"), "an upper bound"


def test_licence_texts_are_the_canonical_ones() -> None:
    for name, digest in CANONICAL.items():
        assert hashlib.sha256((ROOT / name).read_bytes()).hexdigest() == digest, f"{name} was edited"


def test_notice_names_every_bundled_copyleft_component() -> None:
    notice = NOTICE.read_text()
    bundled = bundled_copyleft()
    names = {b.component for b in bundled}
    # What this machine's wheels carry today; the check itself is generic.
    assert {"espeak-ng", "soxr"} <= names
    for item in bundled:
        assert re.search(rf"^{re.escape(item.component)}\b.*--", notice, re.MULTILINE | re.IGNORECASE), (
            f"NOTICE has no section for {item.component} (bundled through {item.via})"
        )
        licence = item.licence.split(";")[0].strip()
        assert licence in notice, f"NOTICE does not name {item.component}'s licence {item.licence!r}"
    assert "Source:" in notice and "https://github.com/espeak-ng/espeak-ng" in notice
    assert IMAGE_LICENSE_DIR + "GPL-3.0.txt" in notice


def test_dockerfile_ships_the_licence_texts_and_the_notice() -> None:
    dockerfile = parse_dockerfile(DOCKERFILE.read_text())
    builder, runtime = _stages(dockerfile)[0], _stages(dockerfile)[-1]
    shipped: dict[str, str] = {}
    for copy in _in_stage(dockerfile, runtime, "COPY"):
        if "--from=" in copy.args:
            continue
        *sources, destination = shlex.split(_strip_flags(copy.args))
        shipped.update({source: destination for source in sources})
    for source in ["LICENSE", "NOTICE", "licenses/GPL-3.0.txt"]:
        assert shipped.get(source) == IMAGE_LICENSE_DIR, (
            f"the runtime stage copies {source} to {IMAGE_LICENSE_DIR}"
        )
        assert (ROOT / source).is_file()
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [s for s in shipped if not _is_included(s, patterns)] == [], ".dockerignore keeps them out"
    # The build backend reads license-files: the builder stage needs them in /src.
    builder_copies = {
        word
        for c in _in_stage(dockerfile, builder, "COPY")
        for word in shlex.split(_strip_flags(c.args))[:-1]
    }
    assert set(PYPROJECT["project"]["license-files"]) <= builder_copies
    (label,) = [i.args for i in _in_stage(dockerfile, runtime, "LABEL") if "image.licenses" in i.args]
    declared = re.search(r'org\.opencontainers\.image\.licenses="([^"]+)"', label)
    assert declared is not None
    licenses = pytest.importorskip("packaging.licenses", reason=SPDX_SKIP)
    licenses.canonicalize_license_expression(declared.group(1))  # the label is an SPDX expression
    for item in bundled_copyleft():
        licence = item.licence.split(";")[0].strip()
        assert licence in declared.group(1), f"image.licenses label misses {licence} ({item.component})"


def test_the_built_wheel_carries_the_licence_metadata(tmp_path: Path) -> None:
    """Builds the wheel as `pip install .` does (isolated, with build-system.requires from the index)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "License classifiers are deprecated" not in result.stderr
    assert "project.license` as a TOML table is deprecated" not in result.stderr
    (wheel,) = tmp_path.glob("tts_streamer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in headers.splitlines()
    for name in PYPROJECT["project"]["license-files"]:
        assert f"License-File: {name}" in headers.splitlines()
        assert any(n.endswith(f".dist-info/licenses/{name}") for n in names)
