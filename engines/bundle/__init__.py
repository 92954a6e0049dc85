"""The bundle: its typed manifest (the contract), staging and verified reads, golden data."""

from engines.bundle.manifest import (
                                     SCHEMA_VERSION,
                                     Accuracy,
                                     Artifact,
                                     Backends,
                                     Calibration,
                                     Environment,
                                     ExportInfo,
                                     Int8Report,
                                     Manifest,
                                     ModelSource,
                                     OrtBackend,
                                     PruneReport,
                                     SparsityReport,
                                     TrtBackend,
)
from engines.bundle.store import (
                                     MANIFEST,
                                     StagedBundle,
                                     add_artifacts,
                                     describe_artifacts,
                                     read_manifest,
                                     update_report,
                                     verified_path,
)
from foundation.files import write_atomic
from foundation.golden import golden_feeds, golden_key, golden_points

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "Accuracy",
    "Artifact",
    "Backends",
    "Calibration",
    "Environment",
    "ExportInfo",
    "Int8Report",
    "Manifest",
    "ModelSource",
    "OrtBackend",
    "PruneReport",
    "SparsityReport",
    "TrtBackend",
    "StagedBundle",
    "add_artifacts",
    "describe_artifacts",
    "golden_feeds",
    "golden_key",
    "golden_points",
    "read_manifest",
    "update_report",
    "verified_path",
    "write_atomic",
]
