"""The TensorRT step of ``planforge build``: profiles checked, engine built or taken from the
engine cache, or skipped with one line saying why.

Engine cache key: sha256 of the ``trt`` graph, the profiles, the build options, the TensorRT
version and the GPU's compute capability. A matching ``<key>.plan`` under ``build/.cache/engines``
is reused; ``--force`` rebuilds. The timing cache file is keyed by TensorRT version and compute
capability (caches from other versions or GPUs are rejected by TensorRT anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from engines.profiles import Profile
from engines.runtime.trt_status import tensorrt_status
from engines.trt_build.builder import build_plan, environment, layer_summary
from foundation.errors import TensorRTUnavailable

logger = logging.getLogger(__name__)


def engine_key(graph_sha256: str, profiles: list[Profile], options: dict, trt_version: str, capability: str) -> str:
    fields = {"graph": graph_sha256, "profiles": [p.to_json() for p in profiles], "options": options,
              "tensorrt": trt_version, "compute_capability": capability}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def timing_cache_path(cache_dir: Path, trt_version: str, capability: str) -> Path:
    return Path(cache_dir) / "timing" / f"trt-{trt_version}-sm{capability.replace('.', '')}.cache"


def build_or_reuse(graph: Path, graph_sha256: str, profiles: list[Profile], options, cache_dir: Path, out_dir: Path,
                   force: bool, require: bool, on_stage: Callable[[str], None]) -> dict:
    """The manifest's ``backends.trt`` entry and environment fields; plan and layers land in ``out_dir``."""
    available, reason = tensorrt_status()
    if not available:
        if require:
            raise TensorRTUnavailable(f"--require-trt: TensorRT cannot build here: {reason}. "
                                      "Build on a machine with TensorRT 11 and an NVIDIA GPU")
        return {"plan": None, "skipped": reason}

    env = environment()
    key = engine_key(graph_sha256, profiles, options.to_json(), env["tensorrt"], env["compute_capability"])
    cached_plan = Path(cache_dir) / "engines" / f"{key}.plan"
    cached_layers = cached_plan.with_suffix(".layers.json")
    reused = cached_plan.is_file() and cached_layers.is_file() and not force
    if reused:
        logger.info("TensorRT: reusing the cached engine %s (same graph, profiles, options, version, GPU)", key[:12])
    else:
        on_stage("tensorrt")
        plan, layers = build_plan(graph, profiles, options,
                                  timing_cache_path(cache_dir, env["tensorrt"], env["compute_capability"]), on_stage)
        cached_plan.parent.mkdir(parents=True, exist_ok=True)
        cached_plan.write_bytes(plan)
        cached_layers.write_text(layers)
    shutil.copyfile(cached_plan, out_dir / "model.plan")
    shutil.copyfile(cached_layers, out_dir / "model.layers.json")
    return {"plan": "model.plan", "layers": "model.layers.json", "skipped": None, "engine_key": key,
            "reused": reused, "options": options.to_json(), **layer_summary(cached_layers.read_text()), "env": env}
