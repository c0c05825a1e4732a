"""Backbone x fold partitions, fixed when the definitions load.

Dagster must know every partition key before a run starts, so the profile is read once at load time
(env ``MELANOMA_PROFILE``, default ``demo``; ``MELANOMA_*`` overrides apply as everywhere else).
Changing backbones or folds therefore means restarting ``dagster dev`` with a different profile/env.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import dagster as dg

from melanoma_ml.config import PipelineConfig

PROFILE_ENV = "MELANOMA_PROFILE"
DEFAULT_PROFILE = "demo"
BACKBONE_DIM = "backbone"
FOLD_DIM = "fold"


def profile_from_env() -> str:
    """The profile named by ``MELANOMA_PROFILE``, or ``demo``."""
    return os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def asset_name_for(backbone: str) -> str:
    """A Dagster-safe asset name for a timm model name (``vit_b16.augreg`` -> ``vit_b16_augreg``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", backbone)


@dataclass(frozen=True)
class TrainingGrid:
    """The backbones and fold numbers the training partitions cover."""

    backbones: tuple[str, ...]
    n_folds: int

    @classmethod
    def from_config(cls, config: PipelineConfig) -> TrainingGrid:
        return cls(tuple(config.backbones), config.data.n_folds)

    @property
    def folds(self) -> list[str]:
        return [str(k) for k in range(self.n_folds)]

    def partitions_def(self) -> dg.MultiPartitionsDefinition:
        return dg.MultiPartitionsDefinition(
            {
                BACKBONE_DIM: dg.StaticPartitionsDefinition(list(self.backbones)),
                FOLD_DIM: dg.StaticPartitionsDefinition(self.folds),
            }
        )

    def keys_for(self, backbone: str) -> list[dg.MultiPartitionKey]:
        """Every training partition key of ``backbone`` (``"<backbone>|<fold>"``).

        ``MultiPartitionKey`` objects, not plain strings: the filesystem IO manager stores each partition
        under ``fold_model/<backbone>/<fold>`` and only finds it again from a ``MultiPartitionKey``.
        """
        return [dg.MultiPartitionKey({BACKBONE_DIM: backbone, FOLD_DIM: f}) for f in self.folds]
