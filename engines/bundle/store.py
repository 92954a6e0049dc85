"""The bundle directory and its manifest: writing atomically, reading with distrust.

A bundle is staged in a hidden sibling directory (``.<name>.partial-XXXX``), the manifest is
written last, and the directory is renamed into place, so a reader sees a complete bundle or
none. Readers check the schema version and every artifact's size and sha256 against the
manifest before anything deserializes it. Lean: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from exporter.core.errors import BuildError, BundleError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_artifacts(root: Path, roles: dict[str, str]) -> dict[str, dict]:
    """Size, sha256 and role of every file in ``root`` except the manifest."""
    out = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.name != MANIFEST):
        out[path.name] = {"size": path.stat().st_size, "sha256": sha256_of(path), "role": roles.get(path.name, "other")}
    return out


class StagedBundle:
    """``with StagedBundle(out, replace=...) as stage:`` write files into ``stage.path``, then
    ``stage.commit(manifest)``. Leaving the block without commit (an error, Ctrl-C) removes the
    staging directory and leaves ``out`` as it was."""

    def __init__(self, out: Path, replace: bool = False):
        self.out = Path(out)
        self.replace = replace
        self.path: Path | None = None
        self.committed = False

    def __enter__(self) -> "StagedBundle":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is as readable as any build output
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, manifest: dict, roles: dict[str, str]) -> dict:
        """Hash the artifacts into the manifest, write it last, rename the bundle into place."""
        manifest = dict(manifest, artifacts=describe_artifacts(self.path, roles))
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, self.path / MANIFEST)
        old = None
        if self.out.exists():
            if not self.replace:
                raise BuildError(f"{self.out} appeared while building; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "bundle")
        os.replace(self.path, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest


def read_manifest(bundle: Path) -> dict:
    """Parse and sanity-check ``bundle/manifest.json``; raise ``BundleError`` with advice."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a directory; expected a bundle built by 'planforge build'")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}: it is not a complete bundle; rebuild it")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is corrupt, rebuild it") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise BundleError(f"{path} has no integer schema_version; it is not a planforge manifest")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path} uses manifest schema {version}, this planforge reads up to {SCHEMA_VERSION}; "
            "upgrade planforge to load it"
        )
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict):
        raise BundleError(f"{path} lists no artifacts; the bundle is corrupt, rebuild it")
    for name in artifacts:
        if Path(name).name != name or name in ("", ".", ".."):
            raise BundleError(f"{path} names artifact {name!r}, which is not a plain file name; refusing the bundle")
    return manifest


def verified_path(bundle: Path, manifest: dict, name: str) -> Path:
    """The artifact's path, after its size and sha256 matched the manifest."""
    entry = manifest["artifacts"].get(name)
    if entry is None:
        raise BundleError(f"{bundle}: the manifest does not list {name!r}; rebuild the bundle")
    path = Path(bundle) / name
    if not path.is_file():
        raise BundleError(f"{bundle}: artifact {name} is missing; rebuild the bundle")
    if path.stat().st_size != entry.get("size") or sha256_of(path) != entry.get("sha256"):
        raise BundleError(
            f"{bundle}: {name} does not match the sha256 in the manifest (changed or truncated "
            "after the build); refusing to load it. Rebuild the bundle or restore the file"
        )
    return path


def add_artifacts(bundle: Path, files: dict[str, tuple[bytes, str]]) -> dict:
    """Write ``{name: (content, role)}`` into a committed bundle and list them in its manifest.

    Each file is written to a temporary name and renamed into place, then the manifest is
    rewritten the same way with their sizes and sha256, so it stays the bundle's one list of
    what may be loaded. Only these entries change; every other artifact keeps its recorded hash.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if not os.access(bundle, os.W_OK):
        raise BundleError(f"{bundle} is not writable; pass --report/-o to write the results elsewhere")
    for name, (content, role) in files.items():
        if Path(name).name != name or name == MANIFEST:
            raise BundleError(f"cannot add {name!r} to a bundle: expected a plain file name other than {MANIFEST}")
        write_atomic(bundle / name, content)
        manifest["artifacts"][name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                                       "role": role}
    write_atomic(bundle / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def update_report(bundle: Path, section: str, value: dict) -> Path:
    """Set one section of the bundle's report.json (the others stay) and re-hash it into the manifest."""
    manifest = read_manifest(bundle)
    report = {}
    if "report.json" in manifest["artifacts"]:
        report = json.loads(verified_path(bundle, manifest, "report.json").read_text())
    content = json.dumps({**report, section: value}, indent=2) + "\n"
    add_artifacts(bundle, {"report.json": (content.encode(), "report")})
    return Path(bundle) / "report.json"


def write_atomic(path: Path, content: bytes) -> None:
    """``content`` at ``path`` via a temporary sibling and a rename: readers see the old file or the new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
