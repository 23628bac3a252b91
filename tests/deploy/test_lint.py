"""Every YAML file under deploy/ passes yamllint, and every shell script of the
repository passes shellcheck (both from their PyPI wheels, dev dependencies)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHELL_SCRIPTS = [ROOT / ".ci" / "run"]


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=120)


def test_the_deploy_yaml_passes_yamllint():
    files = sorted(
        p
        for p in (ROOT / "deploy").rglob("*")
        if p.suffix in (".yml", ".yaml") and "templates" not in p.parts  # Helm's are not YAML yet
    )
    assert len(files) >= 5
    done = _run(BIN / "yamllint", "-c", ROOT / "deploy" / "yamllint.yml", "-s", *files)
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_refuses_a_key_given_twice(tmp_path):
    twice = tmp_path / "twice.yml"
    twice.write_text("route:\n  receiver: a\n  receiver: b\n")
    done = _run(BIN / "yamllint", "-c", ROOT / "deploy" / "yamllint.yml", twice)
    assert done.returncode != 0 and "key-duplicates" in done.stdout


def test_the_shell_scripts_pass_shellcheck():
    done = _run(BIN / "shellcheck", "--severity=style", *SHELL_SCRIPTS)
    assert done.returncode == 0, done.stdout + done.stderr
