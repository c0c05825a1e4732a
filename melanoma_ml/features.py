"""Metadata encoder: age, sex and anatomic site -> a float vector.

Fitted on the training fold only, serialized to plain JSON and shipped inside the serving bundle, so
the app encodes a request exactly as training encoded a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from melanoma_ml import schema


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


@dataclass(frozen=True)
class MetadataEncoder:
    """Encodes (age, sex, site) as ``[age_z, age_missing, sex one-hot..., sex_missing, site one-hot..., site_missing]``.

    Attributes:
        age_mean: Mean age of the training fold (missing ages excluded).
        age_std: Standard deviation of the training ages (1.0 when degenerate).
        sexes: Sex categories seen in training, sorted.
        sites: Site categories seen in training, sorted.
    """

    age_mean: float
    age_std: float
    sexes: tuple[str, ...]
    sites: tuple[str, ...]
    version: int = field(default=1)

    @classmethod
    def fit(cls, table: pd.DataFrame) -> MetadataEncoder:
        """Fit on a training table with ``age_approx``, ``sex`` and site columns."""
        ages = pd.to_numeric(table[schema.AGE], errors="coerce").dropna()
        mean = float(ages.mean()) if len(ages) else 50.0
        std = float(ages.std(ddof=0)) if len(ages) > 1 else 1.0
        if not np.isfinite(std) or std < 1e-6:
            std = 1.0
        sexes = tuple(sorted({str(v).strip().lower() for v in table[schema.SEX] if not _is_missing(v)}))
        sites = tuple(sorted({str(v).strip().lower() for v in table[schema.SITE] if not _is_missing(v)}))
        return cls(age_mean=mean, age_std=std, sexes=sexes, sites=sites)

    @property
    def feature_names(self) -> list[str]:
        return (
            ["age_z", "age_missing"]
            + [f"sex={s}" for s in self.sexes]
            + ["sex_missing"]
            + [f"site={s}" for s in self.sites]
            + ["site_missing"]
        )

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def encode_one(self, age: Any = None, sex: Any = None, site: Any = None) -> np.ndarray:
        """Encode one record. Unknown categories and unparseable ages count as missing."""
        vec = np.zeros(self.n_features, dtype=np.float32)
        try:
            age_value = None if _is_missing(age) else float(age)
        except (TypeError, ValueError):
            age_value = None
        if age_value is None or not np.isfinite(age_value):
            vec[1] = 1.0
        else:
            vec[0] = (age_value - self.age_mean) / self.age_std
        offset = 2
        sex_key = None if _is_missing(sex) else str(sex).strip().lower()
        if sex_key in self.sexes:
            vec[offset + self.sexes.index(sex_key)] = 1.0
        else:
            vec[offset + len(self.sexes)] = 1.0
        offset += len(self.sexes) + 1
        site_key = None if _is_missing(site) else str(site).strip().lower()
        if site_key in self.sites:
            vec[offset + self.sites.index(site_key)] = 1.0
        else:
            vec[offset + len(self.sites)] = 1.0
        return vec

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        """Encode every row of ``table``; returns ``(n_rows, n_features)`` float32."""
        if len(table) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        rows = [
            self.encode_one(a, s, t)
            for a, s, t in zip(table[schema.AGE], table[schema.SEX], table[schema.SITE], strict=True)
        ]
        return np.stack(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "age_mean": self.age_mean,
            "age_std": self.age_std,
            "sexes": list(self.sexes),
            "sites": list(self.sites),
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetadataEncoder:
        """Rebuild from ``to_dict`` output (plain JSON; nothing is unpickled)."""
        try:
            return cls(
                age_mean=float(data["age_mean"]),
                age_std=float(data["age_std"]),
                sexes=tuple(str(s) for s in data["sexes"]),
                sites=tuple(str(s) for s in data["sites"]),
                version=int(data.get("version", 1)),
            )
        except KeyError as exc:
            raise ValueError(f"metadata encoder spec is missing field {exc}; re-export the bundle") from exc

    @property
    def vocabulary(self) -> dict[str, Sequence[str]]:
        """Choices for a UI: the categories this encoder knows."""
        return {"sex": list(self.sexes), "site": list(self.sites)}
