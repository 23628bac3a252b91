"""Checking tools built from Go modules, once, into ``<cache>/tools/go``: Helm,
kubeconform and kube-score at pinned versions, and vtp's own ``compose-check`` and
``dashboard-check`` (``deploy/checks``: the compose-go loader behind ``docker compose
config`` and the Grafana foundation SDK's dashboard model). The Go module proxy is the
only source; the first build takes a few minutes (Helm alone about two), later calls
find the binaries. A binary is rebuilt when its pinned version, or vtp's checks' source,
changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from deploy.broker import locked
from vtp.core.settings import Settings

UPSTREAM = {
    "helm": "helm.sh/helm/v3/cmd/helm@v3.22.0",
    "kubeconform": "github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0",
    "kube-score": "github.com/zegl/kube-score/cmd/kube-score@v1.20.0",
}
CHECKS = Path(__file__).resolve().parent / "checks"
OWN = ("compose-check", "dashboard-check")  # commands under deploy/checks/cmd
BUILD_TIMEOUT_S = 900.0


class GoToolError(RuntimeError):
    pass


def go_root(settings: Settings) -> Path:
    return settings.cache_dir / "tools" / "go"


def go_environment(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GOPATH": str(root / "path"),
        "GOMODCACHE": str(root / "path" / "pkg" / "mod"),
        "GOCACHE": str(root / "build-cache"),
        "GOBIN": str(root / "bin"),
        "GOTOOLCHAIN": "local",  # the machine's Go; a go.mod never fetches another
        "GOFLAGS": "-buildvcs=false -mod=readonly",
        "CGO_ENABLED": "0",
    }


def _own_source_stamp() -> str:
    digest = hashlib.sha256()
    for path in sorted(CHECKS.rglob("*")):
        if path.is_file() and path.suffix in (".go", ".mod", ".sum"):
            digest.update(str(path.relative_to(CHECKS)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _wanted(name: str) -> str:
    return UPSTREAM[name] if name in UPSTREAM else f"deploy/checks {_own_source_stamp()}"


def _build(name: str, root: Path) -> None:
    if name in UPSTREAM:
        command, cwd = ["go", "install", UPSTREAM[name]], root
    else:
        command = ["go", "build", "-o", str(root / "bin" / name), f"./cmd/{name}"]
        cwd = CHECKS
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=go_environment(root),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise GoToolError("go not found: the checking tools are built from Go modules") from None
    except subprocess.TimeoutExpired:
        raise GoToolError(f"building {name} took longer than {BUILD_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise GoToolError(f"{' '.join(command)} failed: {done.stderr.strip()[-800:]}")


def go_tool(name: str, settings: Settings) -> Path:
    """The path of a Go-built checking tool, building it first if it is missing or stale."""
    if name not in UPSTREAM and name not in OWN:
        raise GoToolError(f"{name} is not a Go-built checking tool")
    root = go_root(settings)
    binary, stamp = root / "bin" / name, root / "bin" / f".{name}.built"
    wanted = _wanted(name)
    if binary.exists() and stamp.exists() and stamp.read_text() == wanted:
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{name}.lock"):
        if not (binary.exists() and stamp.exists() and stamp.read_text() == wanted):
            _build(name, root)
            stamp.write_text(wanted)
    return binary


def build_all(settings: Settings) -> list[Path]:
    return [go_tool(name, settings) for name in (*UPSTREAM, *OWN)]
