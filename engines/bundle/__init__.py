"""The bundle: its typed manifest (the contract), staging and verified reads, golden data."""

from exporter.core.golden import golden_feeds, golden_key, golden_points
from engines.bundle.store import (MANIFEST, SCHEMA_VERSION, StagedBundle, add_artifacts, describe_artifacts,
                                  read_manifest, update_report, verified_path, write_atomic)

__all__ = ["MANIFEST", "SCHEMA_VERSION", "StagedBundle", "add_artifacts", "describe_artifacts", "golden_feeds",
           "golden_key", "golden_points", "read_manifest", "update_report", "verified_path", "write_atomic"]
