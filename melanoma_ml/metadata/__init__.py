"""Reading, cleaning, layout detection and merging of ISIC-family metadata (pandas only, no torch).

Public API:
    read_table, require_columns, MetadataError: ``io``
    clean_metadata: ``clean``
    CleaningResult: ``result``
    detect_layout, load_dataset, LayoutMatch: ``layouts``
    merge_sources: ``merge``
"""

from melanoma_ml.metadata.clean import clean_metadata
from melanoma_ml.metadata.io import MetadataError, MetadataFileNotFound, read_table, require_columns
from melanoma_ml.metadata.layouts import LayoutMatch, detect_layout, find_image_dirs, load_dataset
from melanoma_ml.metadata.merge import merge_sources
from melanoma_ml.metadata.result import CleaningResult

__all__ = [
    "CleaningResult",
    "LayoutMatch",
    "MetadataError",
    "MetadataFileNotFound",
    "clean_metadata",
    "detect_layout",
    "find_image_dirs",
    "load_dataset",
    "merge_sources",
    "read_table",
    "require_columns",
]
