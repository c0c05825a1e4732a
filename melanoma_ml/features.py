"""Metadata encoder: age, sex, anatomic site and optional numeric tabular columns -> a float vector.

Fitted on the training fold only, serialized to plain JSON and shipped inside the serving bundle, so
the app encodes a request exactly as training encoded a row.

Tabular columns (``model.tabular_features``, e.g. ISIC 2024's ``tbp_lv_*`` measurements) follow one rule,
in training and serving alike: a value is missing when ``melanoma_ml.missing`` says so or it is not finite;
a recorded value becomes ``(x - median) / scale`` clipped to ``+/- tabular_clip``, where ``median`` and
``scale`` come from the training fold's finite values (``scale`` is the interquartile range, the standard
deviation when that is 0, and 1.0 when both are); a missing value becomes the median (0 after scaling) and
sets the column's ``<name>_missing`` flag. Text that is neither missing nor a number is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from melanoma_ml import schema
from melanoma_ml.errors import InputValueError
from melanoma_ml.missing import is_missing, text_key, text_keys

TABULAR_CLIP = 10.0
"""Scaled tabular values are clipped to +/- this: ISIC 2024 areas and colour deltas have long tails, and one
extreme lesion should not dominate a BatchNorm batch."""


def numeric_column(values: pd.Series, name: str) -> np.ndarray:
    """``values`` as float64 with NaN wherever a value is missing or not finite.

    Raises:
        InputValueError: a recorded value that is not a number (the message names the column and row).
    """
    numbers = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy(copy=True)
    unparsed = np.flatnonzero(np.isnan(numbers) & values.notna().to_numpy())
    for position in unparsed:  # NaN after coercion: either a missing token or text that is not a number
        if not is_missing(values.iloc[position]):
            raise InputValueError(
                f"tabular column {name!r} row {values.index[position]!r} holds {values.iloc[position]!r}, "
                "which is not a number; fix the value, leave it empty for missing, or drop the column "
                "from model.tabular_features"
            )
    numbers[~np.isfinite(numbers)] = np.nan
    return numbers


def _tabular_stats(values: np.ndarray) -> tuple[float, float]:
    """``(median, scale)`` of the finite ``values`` by the module docstring's rule."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return 0.0, 1.0
    q25, median, q75 = np.percentile(finite, [25, 50, 75])
    scale = float(q75 - q25)
    if not scale > 1e-12:
        scale = float(finite.std())
    if not scale > 1e-12:
        scale = 1.0
    return float(median), scale


@dataclass(frozen=True)
class MetadataEncoder:
    """Encodes (age, sex, site) as ``[age_z, age_missing, sex one-hot..., sex_missing, site one-hot..., site_missing]``,
    then, when fitted with tabular columns, ``[<col>..., <col>_missing...]`` (module docstring: the rule).

    Attributes:
        age_mean: Mean age of the training fold (missing ages excluded).
        age_std: Standard deviation of the training ages (1.0 when degenerate).
        sexes: Sex categories seen in training, sorted.
        sites: Site categories seen in training, sorted.
        tabular: Numeric tabular columns, in ``model.tabular_features`` order (empty: none).
        tabular_median: The training fold's median of each tabular column.
        tabular_scale: The training fold's scale (IQR, else std, else 1) of each tabular column.
        tabular_clip: Scaled values are clipped to +/- this.
    """

    age_mean: float
    age_std: float
    sexes: tuple[str, ...]
    sites: tuple[str, ...]
    version: int = field(default=1)
    tabular: tuple[str, ...] = ()
    tabular_median: tuple[float, ...] = ()
    tabular_scale: tuple[float, ...] = ()
    tabular_clip: float = TABULAR_CLIP

    def __post_init__(self) -> None:
        if not len(self.tabular) == len(self.tabular_median) == len(self.tabular_scale):
            raise InputValueError(
                f"metadata encoder has {len(self.tabular)} tabular columns but {len(self.tabular_median)} "
                f"medians and {len(self.tabular_scale)} scales; re-export the bundle"
            )

    @classmethod
    def fit(cls, table: pd.DataFrame, tabular: Sequence[str] = ()) -> MetadataEncoder:
        """Fit on a training table with ``age_approx``, ``sex`` and site columns (and ``tabular`` ones).

        Raises:
            InputValueError: a ``tabular`` column the table lacks, or one holding text that is not a number.
        """
        absent = [c for c in tabular if c not in table.columns]
        if absent:
            raise InputValueError(
                f"model.tabular_features names columns {absent} that the training table does not have; "
                "use a dataset with them (e.g. the isic2024 layout) or remove them from model.tabular_features"
            )
        stats = [_tabular_stats(numeric_column(table[c], c)) for c in tabular]
        ages = pd.to_numeric(table[schema.AGE], errors="coerce").astype("float64")
        ages = ages[np.isfinite(ages)]  # what ``encode_one`` reads as an age
        mean = float(ages.mean()) if len(ages) else 50.0
        std = float(ages.std(ddof=0)) if len(ages) > 1 else 1.0
        if not np.isfinite(std) or std < 1e-6:
            std = 1.0
        sexes = tuple(sorted(set(text_keys(table[schema.SEX]).dropna())))
        sites = tuple(sorted(set(text_keys(table[schema.SITE]).dropna())))
        return cls(
            age_mean=mean,
            age_std=std,
            sexes=sexes,
            sites=sites,
            tabular=tuple(tabular),
            tabular_median=tuple(m for m, _ in stats),
            tabular_scale=tuple(s for _, s in stats),
        )

    @property
    def feature_names(self) -> list[str]:
        return (
            ["age_z", "age_missing"]
            + [f"sex={s}" for s in self.sexes]
            + ["sex_missing"]
            + [f"site={s}" for s in self.sites]
            + ["site_missing"]
            + list(self.tabular)
            + [f"{c}_missing" for c in self.tabular]
        )

    @property
    def _n_base(self) -> int:
        """Width of the age/sex/site part (the tabular part follows it)."""
        return len(self.sexes) + len(self.sites) + 4

    def _tabular_block(self, values: np.ndarray) -> np.ndarray:
        """``(n, k)`` raw values (NaN = missing) -> ``(n, 2k)`` float32 ``[scaled..., missing flags...]``."""
        missing = np.isnan(values)
        scaled = (values - np.asarray(self.tabular_median)) / np.asarray(self.tabular_scale)
        scaled = np.clip(np.where(missing, 0.0, scaled), -self.tabular_clip, self.tabular_clip)
        return np.hstack([scaled, missing]).astype(np.float32)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def encode_one(
        self, age: Any = None, sex: Any = None, site: Any = None, tabular: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """Encode one record. Unknown categories and unparseable ages count as missing.

        Args:
            tabular: ``{column: value}`` for this encoder's tabular columns; absent columns are missing.

        Raises:
            InputValueError: a tabular column this encoder does not know, or a value that is not a number.
        """
        vec = np.zeros(self.n_features, dtype=np.float32)
        try:
            age_value = None if is_missing(age) else float(age)
        except (TypeError, ValueError):
            age_value = None
        if age_value is None or not np.isfinite(age_value):
            vec[1] = 1.0
        else:
            vec[0] = (age_value - self.age_mean) / self.age_std
        offset = 2
        sex_key = text_key(sex)
        if sex_key in self.sexes:
            vec[offset + self.sexes.index(sex_key)] = 1.0
        else:
            vec[offset + len(self.sexes)] = 1.0
        offset += len(self.sexes) + 1
        site_key = text_key(site)
        if site_key in self.sites:
            vec[offset + self.sites.index(site_key)] = 1.0
        else:
            vec[offset + len(self.sites)] = 1.0
        if self.tabular:
            tabular = dict(tabular or {})
            unknown = sorted(set(tabular) - set(self.tabular))
            if unknown:
                raise InputValueError(
                    f"unknown tabular features {unknown}; this model uses {list(self.tabular)}"
                )
            row = pd.DataFrame([{c: tabular.get(c) for c in self.tabular}], dtype=object)
            vec[self._n_base :] = self._tabular_block(self._tabular_values(row))[0]
        elif tabular:
            raise InputValueError(
                f"tabular features {sorted(tabular)} were given, but this model was trained without any; "
                "leave them out"
            )
        return vec

    def _tabular_values(self, table: pd.DataFrame) -> np.ndarray:
        """``(n, k)`` float64 of the tabular columns, NaN where missing."""
        return np.column_stack([numeric_column(table[c], c) for c in self.tabular])

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        """Encode every row of ``table``; returns ``(n_rows, n_features)`` float32."""
        if len(table) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        rows = [
            self.encode_one(a, s, t)
            for a, s, t in zip(table[schema.AGE], table[schema.SEX], table[schema.SITE], strict=True)
        ]
        out = np.stack(rows)
        if self.tabular:
            absent = [c for c in self.tabular if c not in table.columns]
            if absent:
                raise InputValueError(
                    f"table lacks the tabular columns {absent} this encoder was fitted with; "
                    "encode a table from the same dataset layout"
                )
            out[:, self._n_base :] = self._tabular_block(self._tabular_values(table))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON; the ``tabular`` entry appears only when there are tabular columns (old shape kept)."""
        out: dict[str, Any] = {
            "version": self.version,
            "age_mean": self.age_mean,
            "age_std": self.age_std,
            "sexes": list(self.sexes),
            "sites": list(self.sites),
        }
        if self.tabular:
            out["tabular"] = {
                "columns": list(self.tabular),
                "median": list(self.tabular_median),
                "scale": list(self.tabular_scale),
                "clip": self.tabular_clip,
            }
        out["feature_names"] = self.feature_names
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetadataEncoder:
        """Rebuild from ``to_dict`` output (plain JSON; nothing is unpickled)."""
        try:
            tabular = data.get("tabular") or {"columns": [], "median": [], "scale": [], "clip": TABULAR_CLIP}
            return cls(
                age_mean=float(data["age_mean"]),
                age_std=float(data["age_std"]),
                sexes=tuple(str(s) for s in data["sexes"]),
                sites=tuple(str(s) for s in data["sites"]),
                version=int(data.get("version", 1)),
                tabular=tuple(str(c) for c in tabular["columns"]),
                tabular_median=tuple(float(m) for m in tabular["median"]),
                tabular_scale=tuple(float(s) for s in tabular["scale"]),
                tabular_clip=float(tabular["clip"]),
            )
        except KeyError as exc:
            raise InputValueError(
                f"metadata encoder spec is missing field {exc}; re-export the bundle"
            ) from exc

    @property
    def vocabulary(self) -> dict[str, Sequence[str]]:
        """Choices for a UI: the categories this encoder knows."""
        return {"sex": list(self.sexes), "site": list(self.sites)}


def metadata_dict(row: Any, tabular: Sequence[str] = ()) -> dict[str, Any]:
    """``{"age", "sex", "site"}`` for one cleaned-table row (missing -> None): a request's metadata.

    Args:
        row: An ``itertuples`` row (or any object with the columns as attributes).
        tabular: Tabular columns to add as ``"tabular": {column: value}`` (a bundle's ``encoder.tabular``);
            none adds no key, the shape a model without tabular features takes.
    """
    out = {
        "age": None if is_missing(row.age_approx) else float(row.age_approx),
        "sex": text_key(row.sex),
        "site": text_key(row.anatom_site_general_challenge),
    }
    if tabular:
        out["tabular"] = {c: getattr(row, c) for c in tabular}
    return out
