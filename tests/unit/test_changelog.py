"""The version says what the changelog says: a release, or the next one in the making."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_the_version_follows_the_changelog():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert released == sorted(released, key=version_tuple, reverse=True), "newest first"
    unreleased = changelog.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    if re.search(r"^- ", unreleased, re.M):
        base, _, dev = version.partition(".dev")
        assert dev.isdigit() and version_tuple(base) > version_tuple(released[0]), (
            f"Unreleased has entries: the version must be a .devN of the next release, "
            f"not {version}"
        )
    else:
        assert version == released[0]
