"""A value with its confidence interval: the one shape every layer uses (report, gate, bundle, app, CLI).

An :class:`Estimate` is ``value, lo, hi, level``; bounds that could not be estimated are NaN. On disk it is
the dict ``{"value", "lo", "hi", "level"}`` (NaN stored as ``null``), written by :meth:`Estimate.to_dict`
and read back by :meth:`Estimate.from_dict`, which also reads dicts written before ``level`` was stored
and the paired-difference dict of ``compare.paired_auc_difference`` (``{"diff", "lo", "hi", "ci_level"}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from melanoma_ml.config import EvaluationConfig
from melanoma_ml.errors import InputValueError

DEFAULT_CI_LEVEL: float = EvaluationConfig.model_fields["ci_level"].default
"""The level assumed for a stored estimate that does not name one (written before levels were stored)."""


def _number(raw: Any) -> float:
    """A stored bound or value: ``None`` (JSON for NaN) is NaN; anything else must be a real number."""
    if raw is None:
        return math.nan
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise TypeError(f"{raw!r} is not a number")
    return float(raw)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def level_text(level: float) -> str:
    """``0.95`` -> ``"95%"``, ``0.975`` -> ``"97.5%"``."""
    return f"{round(level * 100, 4):g}%"


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its confidence interval.

    Attributes:
        value: The point estimate (NaN when it could not be computed, e.g. a single-class subgroup).
        lo: Lower CI bound (NaN when not estimable).
        hi: Upper CI bound (NaN when not estimable).
        level: Coverage of the interval, e.g. ``0.95`` (``EvaluationConfig.ci_level``).
    """

    value: float
    lo: float
    hi: float
    level: float

    @property
    def is_finite(self) -> bool:
        """Whether the value and both bounds are finite numbers."""
        return all(math.isfinite(v) for v in (self.value, self.lo, self.hi))

    def text(self, digits: int = 3, *, show_level: bool = True) -> str:
        """``"0.810 [0.780, 0.850] (95% CI)"``; ``"0.810 (no CI)"`` without bounds, ``"n/a"`` without a value.

        Args:
            digits: Decimals of the numbers.
            show_level: Append ``"(95% CI)"`` (off where a table header already names the level).
        """
        if not math.isfinite(self.value):
            return "n/a"
        value = f"{self.value:.{digits}f}"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{value} (no CI)"
        interval = f"{value} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"
        return f"{interval} ({level_text(self.level)} CI)" if show_level else interval

    def __str__(self) -> str:
        return self.text()

    def to_dict(self) -> dict[str, float | None]:
        """``{"value", "lo", "hi", "level"}``, JSON-safe (NaN as ``None``); inverse of :meth:`from_dict`."""
        return {
            "value": _json_number(self.value),
            "lo": _json_number(self.lo),
            "hi": _json_number(self.hi),
            "level": self.level,
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any] | Estimate,
        *,
        default_level: float = DEFAULT_CI_LEVEL,
        where: str = "estimate",
    ) -> Estimate:
        """Read ``{"value", "lo", "hi", "level"}`` (``None`` read as NaN); an ``Estimate`` is returned as is.

        Also read: dicts without ``level`` (stored before it was; ``default_level`` is assumed) and the
        paired difference ``{"diff", "lo", "hi", "ci_level"}`` of ``compare.paired_auc_difference``.

        Args:
            data: The stored dict.
            default_level: The level when ``data`` names none (e.g. the report's ``ci_level``).
            where: What ``data`` is, for error messages (e.g. ``"bundle v0003 metric auc"``).

        Raises:
            InputValueError: not a dict, a missing key, a non-number, a level outside (0, 1) or lo > hi.
        """
        if isinstance(data, Estimate):
            return data
        expected = "{'value': .., 'lo': .., 'hi': .., 'level': ..}"
        if not isinstance(data, Mapping):
            raise InputValueError(f"{where} must be a dict {expected}, got {data!r}")
        point_key = "value" if "value" in data or "diff" not in data else "diff"
        missing = [key for key in (point_key, "lo", "hi") if key not in data]
        if missing:
            raise InputValueError(f"{where} lacks {missing}; expected {expected}, got {dict(data)}")
        level_raw = data.get("level", data.get("ci_level", default_level))
        try:
            value, lo, hi, level = (
                _number(data[point_key]),
                _number(data["lo"]),
                _number(data["hi"]),
                _number(level_raw),
            )
        except (TypeError, ValueError) as exc:
            raise InputValueError(f"{where} holds a non-number ({exc}): {dict(data)}") from exc
        if not 0.0 < level < 1.0:
            raise InputValueError(
                f"{where} has CI level {level_raw!r}; a level is a fraction in (0, 1), e.g. 0.95"
            )
        if lo > hi:  # False when either bound is NaN
            raise InputValueError(f"{where} has lo > hi ({dict(data)}); the interval is malformed")
        return cls(value, lo, hi, level)
