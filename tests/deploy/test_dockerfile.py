"""The container image's Dockerfile, checked by hadolint (the PyPI wheel that ships the
binary; no image is built here: these machines have no Docker engine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_finds_nothing_even_at_info_level():
    done = _hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_refuses_an_unpinned_base_a_root_user_and_unpinned_packages(tmp_path):
    worse = tmp_path / "Dockerfile"
    worse.write_text(
        DOCKERFILE.read_text()
        .replace("FROM python:3.11.7-slim-bookworm\n", "FROM python:latest\n")
        .replace("USER 10001:10001", "USER root")
        .replace("/wheels/vtp-*.whl", "vtp")
    )
    found = set(re.findall(r"DL\d{4}", _hadolint(worse).stdout))
    assert {"DL3007", "DL3002", "DL3013"} <= found


def test_every_path_the_image_copies_exists_and_no_kafka_jar_goes_in():
    copied = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            copied += sources
    assert copied and all((ROOT / source).exists() for source in copied), copied
    assert not any(".cache" in s or s.endswith(".jar") or s == "." for s in copied)
    # the last user is the unprivileged one the image creates
    users = [
        line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")
    ]
    assert users[-1] == "10001:10001"
