"""The Dagster layer of the melanoma pipeline: thin assets over ``melanoma_ml``.

Entry point: ``melanoma_assets.definitions:defs`` (``dagster dev -w workspace.yaml``).
"""
