"""``planforge pack BUNDLE -o DIR [--runtime-only]``: a verified copy of a bundle, or only what production loads.

Every artifact copied is checked against the source manifest first (a tampered file is never
passed on). ``--runtime-only`` keeps what ``engines.runtime`` loads: the ONNX Runtime graph, the
TensorRT plan when there is one, and external data they reference; it leaves out the exported graph,
golden and evaluation data, calibration and reports. The copy gets its own manifest, listing only
what it holds with the same sha256, and a ``packed`` record (what it came from and what was left
out), so it verifies like any bundle and a command that needs a missing artifact says why.
Written like a build: staged in a temporary directory, the manifest last, renamed into place.
Lean: standard library only.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from pathlib import Path

from engines.bundle.manifest import Manifest
from engines.bundle.store import StagedBundle, read_manifest, verified_path
from foundation.errors import BundleError, UsageError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackResult:
    out: Path
    manifest: Manifest
    omitted: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(a.size for a in self.manifest.artifacts.values())


def runtime_artifacts(manifest: Manifest) -> list[str]:
    """What ``engines.runtime`` loads: the ort graph, the TensorRT plan, and the graph's external data."""
    names = [manifest.backends.ort.graph]
    if manifest.backends.trt.plan:
        names.append(manifest.backends.trt.plan)
    names += [n for n, a in manifest.artifacts.items()
              if a.role == "external-data" and n.startswith(f"{manifest.backends.ort.graph}.")]
    return names


def pack(bundle: Path, out: Path, runtime_only: bool = False, force: bool = False) -> PackResult:
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    if out.exists() and (out.resolve() == bundle.resolve() or not force):
        raise UsageError(
            f"{out} exists; choose another -o or pass --force to replace it"
            if out.resolve() != bundle.resolve()
            else f"-o {out} is the bundle itself; choose another directory"
        )
    keep = runtime_artifacts(manifest) if runtime_only else list(manifest.artifacts)
    missing = [n for n in keep if n not in manifest.artifacts]
    if missing:
        raise BundleError(f"{bundle}: the manifest does not list {', '.join(missing)}, which the runtime loads; "
                          "rebuild the bundle")
    omitted = tuple(n for n in manifest.artifacts if n not in keep)
    with StagedBundle(out, replace=force) as stage:
        for name in keep:
            shutil.copyfile(verified_path(bundle, manifest, name), stage.path / name)
        packed = {"from_build_key": manifest.build_key, "runtime_only": runtime_only, "omitted": list(omitted),
                  "packed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        roles = {n: manifest.artifacts[n].role for n in keep}
        written = stage.commit(dataclasses.replace(manifest, packed=packed), roles)
    logger.debug("packed %s into %s: %d artifact(s)%s", bundle, out, len(keep),
                f", left out {', '.join(omitted)}" if omitted else "")
    return PackResult(out, written, omitted)
