"""Query an embedded atlas: an index of every level, nearest cells and label transfer per level."""

from .index import AtlasIndex, IndexMismatch, IndexSettings, build_index, default_index_path, read_manifest
from .transfer import AtlasLabels, map_levels, query, resolve_index

__all__ = [
    "AtlasIndex",
    "AtlasLabels",
    "IndexMismatch",
    "IndexSettings",
    "build_index",
    "default_index_path",
    "map_levels",
    "query",
    "read_manifest",
    "resolve_index",
]
