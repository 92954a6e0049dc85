"""The bundle directory: staging, writing atomically, reading with distrust.

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

from engines.bundle.manifest import SCHEMA_VERSION, Artifact, Manifest
from foundation.errors import BuildError, BundleError, IntegrityError
from foundation.files import sha256_file, write_atomic

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def describe_artifacts(root: Path, roles: dict[str, str]) -> dict[str, Artifact]:
    """Size, sha256 and role of every file in ``root`` except the manifest."""
    return {path.name: Artifact(path.stat().st_size, sha256_file(path).hexdigest(), roles.get(path.name, "other"))
            for path in sorted(p for p in root.iterdir() if p.is_file() and p.name != MANIFEST)}


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2) + "\n").encode()


class StagedBundle:
    """``with StagedBundle(out, replace=...) as stage:`` write files into ``stage.path``, then
    ``stage.commit(manifest)``. Leaving the block without commit (an error, Ctrl-C) removes the
    staging directory and leaves ``out`` as it was."""

    def __init__(self, out: Path, replace: bool = False):
        self.out = Path(out)
        self.replace = replace
        self.path: Path | None = None
        self.committed = False

    def __enter__(self) -> StagedBundle:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is as readable as any build output
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, manifest: Manifest, roles: dict[str, str]) -> Manifest:
        """Hash the artifacts into the manifest, write it last, rename the bundle into place."""
        manifest = manifest.with_artifacts(describe_artifacts(self.path, roles))
        write_atomic(self.path / MANIFEST, _manifest_bytes(manifest))
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


def _umask() -> int:
    """The process umask, read from /proc where it can be: setting it to read it (``os.umask``) is a
    process-wide change other threads could see; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def read_manifest(bundle: Path) -> Manifest:
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
    return Manifest.from_json(manifest, str(path))


def verified_path(bundle: Path, manifest: Manifest, name: str) -> Path:
    """The artifact's path, after its size and sha256 matched the manifest; a graph's external weights
    (``<name>.data``, listed beside it) are checked with it, since loading the graph reads them."""
    if f"{name}.data" in manifest.artifacts:
        verified_path(bundle, manifest, f"{name}.data")
    entry = manifest.artifacts.get(name)
    if entry is None and manifest.packed and name in manifest.packed.get("omitted", ()):
        raise BundleError(f"{bundle} is a runtime-only pack (planforge pack --runtime-only): it holds what the runtime "
                          f"loads, not {name}; run this on the full bundle it was packed from")
    if entry is None:
        raise BundleError(f"{bundle}: the manifest does not list {name!r}; rebuild the bundle")
    path = Path(bundle) / name
    if not path.is_file():
        raise BundleError(f"{bundle}: artifact {name} is missing; rebuild the bundle")
    if path.stat().st_size != entry.size or sha256_file(path).hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{bundle}: {name} does not match the sha256 in the manifest (changed or truncated "
            "after the build); refusing to load it. Rebuild the bundle or restore the file"
        )
    return path


def add_artifacts(bundle: Path, files: dict[str, tuple[bytes, str]]) -> Manifest:
    """Write ``{name: (content, role)}`` into a committed bundle and list them in its manifest.

    Each file is written to a temporary name and renamed into place, then the manifest is
    rewritten the same way with their sizes and sha256, so it stays the bundle's one list of
    what may be loaded. Only these entries change; every other artifact keeps its recorded hash.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if not os.access(bundle, os.W_OK):
        raise BundleError(f"{bundle} is not writable; pass --report/-o to write the results elsewhere")
    artifacts = dict(manifest.artifacts)
    for name, (content, role) in files.items():
        if Path(name).name != name or name == MANIFEST:
            raise BundleError(f"cannot add {name!r} to a bundle: expected a plain file name other than {MANIFEST}")
        write_atomic(bundle / name, content)
        artifacts[name] = Artifact(len(content), hashlib.sha256(content).hexdigest(), role)
    manifest = manifest.with_artifacts(artifacts)
    write_atomic(bundle / MANIFEST, _manifest_bytes(manifest))
    return manifest


def update_report(bundle: Path, section: str, value: dict) -> Path:
    """Set one section of the bundle's report.json (the others stay) and re-hash it into the manifest."""
    manifest = read_manifest(bundle)
    report = {}
    if "report.json" in manifest.artifacts:
        report = json.loads(verified_path(bundle, manifest, "report.json").read_text())
    content = json.dumps({**report, section: value}, indent=2) + "\n"
    add_artifacts(bundle, {"report.json": (content.encode(), "report")})
    return Path(bundle) / "report.json"
