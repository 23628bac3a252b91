"""The checking tools operators' artefacts are tested with, fetched once into the cache.

``python -m deploy.tools`` (``make tools``) gets them all:

- Prometheus and its ``promtool``, and Alertmanager's ``amtool``, from Debian's own
  packages (``apt-get download``, then unpacked with ``dpkg-deb -x`` under
  ``<cache>/tools/debian``: nothing is installed on the machine);
- Helm, kubeconform, kube-score and vtp's compose and dashboard checks, built from Go
  modules (``deploy.gotools``);
- the Kubernetes and Strimzi schemas kubeconform reads (``deploy.k8s_schemas``).

Later calls, and runs, are offline. ``tool("promtool")`` is a tool's path.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy.broker import locked
from deploy.gotools import OWN, UPSTREAM, GoToolError, build_all, go_tool
from deploy.k8s_schemas import SchemaError, fetch_schemas
from vtp.core.settings import Settings, load_settings

# Debian package -> the programs of it vtp's tests run
DEBIAN_PACKAGES = {
    "prometheus": ("prometheus", "promtool"),
    "prometheus-alertmanager": ("amtool",),
}
TIMEOUT_S = 300.0


class ToolError(RuntimeError):
    pass


def debian_root(settings: Settings) -> Path:
    return settings.cache_dir / "tools" / "debian"


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise ToolError(
            f"{command[0]} not found: the checking tools come from Debian's packages"
        ) from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{' '.join(command)} did not finish within {TIMEOUT_S:.0f} s") from None


def _download(packages: list[str], into: Path) -> None:
    done = _run(["apt-get", "download", *packages], into)
    if done.returncode != 0:
        # A machine whose package lists were never fetched knows no candidate yet.
        update = _run(["apt-get", "update", "-qq"], into)
        done = _run(["apt-get", "download", *packages], into)
        if done.returncode != 0:
            raise ToolError(
                f"apt-get download {' '.join(packages)} failed: {done.stderr.strip()[-400:]}"
                + (f" (apt-get update: {update.stderr.strip()[-200:]})" if update.stderr else "")
            )


def fetch_tools(settings: Settings) -> Path:
    """Unpack the packages once; returns the folder whose ``usr/bin`` holds the tools."""
    root = debian_root(settings)
    marker = root / ".complete"
    if marker.exists():
        return root
    with locked(root.parent / ".debian.lock"):
        if marker.exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as folder:
            debs = Path(folder)
            _download(list(DEBIAN_PACKAGES), debs)
            versions = []
            for deb in sorted(debs.glob("*.deb")):
                unpacked = _run(["dpkg-deb", "-x", str(deb), str(root)], debs)
                if unpacked.returncode != 0:
                    raise ToolError(f"dpkg-deb -x {deb.name}: {unpacked.stderr.strip()}")
                versions.append(deb.name)
        missing = [t for tools in DEBIAN_PACKAGES.values() for t in tools if not _bin(root, t)]
        if missing:
            raise ToolError(f"the packages hold no {', '.join(missing)}")
        marker.write_text("\n".join(versions) + "\n")
    return root


def _bin(root: Path, name: str) -> Path | None:
    path = root / "usr" / "bin" / name
    return path if path.exists() else None


def tool(name: str, settings: Settings | None = None) -> Path:
    """The path of a fetched tool (fetching or building it first if need be)."""
    settings = settings or load_settings()
    if name in UPSTREAM or name in OWN:
        return go_tool(name, settings)
    root = fetch_tools(settings)
    path = _bin(root, name)
    if path is None:
        raise ToolError(f"{name} is not among the fetched tools")
    return path


def main() -> None:
    settings = load_settings()
    try:
        root = fetch_tools(settings)
        built = build_all(settings)
        schemas = fetch_schemas(settings)
    except (ToolError, GoToolError, SchemaError) as exc:
        sys.exit(f"vtp tools: {exc}")
    print(
        f"checking tools in {root / 'usr' / 'bin'}: "
        + ", ".join((root / ".complete").read_text().split())
    )
    print(f"built from Go modules in {built[0].parent}: {', '.join(p.name for p in built)}")
    print(f"schemas for kubeconform in {schemas}: {(schemas / '.complete').read_text().strip()}")


if __name__ == "__main__":
    main()
