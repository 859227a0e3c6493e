"""Mapping backends: each answers 'which upstream serves this key?'."""

from __future__ import annotations

from willi.config import CsvMappingConfig, MappingConfig, SqlMappingConfig, StaticMappingConfig
from willi.mappings.base import Mapping, MappingError

__all__ = ["Mapping", "MappingError", "build_mapping"]


def build_mapping(config: MappingConfig, index: int, *, case_sensitive_local: bool = False) -> Mapping:
    """Instantiate the backend a `[[mappings]]` table describes."""
    if isinstance(config, StaticMappingConfig):
        from willi.mappings.static import StaticMapping

        return StaticMapping(config.route, index)
    if isinstance(config, CsvMappingConfig):
        from willi.mappings.csv import CsvMapping

        return CsvMapping(config.file, index, reload_interval=config.reload_interval,
                          case_sensitive_local=case_sensitive_local)
    if isinstance(config, SqlMappingConfig):
        from willi.mappings.mysql import SqlMapping  # imported late: only sql users need the connector

        return SqlMapping(config, index, case_sensitive_local=case_sensitive_local)
    raise TypeError(f"unknown mapping config {config!r}")

