"""A prediction request's fields, read and validated: the one reading the app and ``melanoma-ml predict`` share.

``parse_metadata`` turns a request's age, sex and site into the model's metadata, refusing what the model
cannot use (an age outside the accepted range or not a number, a category the model was not trained with)
with a message that says what to change. The app refuses such a request (``parse_metadata``); batch scoring
scores the image with that field missing and reports the message (``parse_metadata_leniently``), so both
read every value the same way. Pure functions: no model, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from melanoma_ml import schema
from melanoma_ml.ages import normalize_age
from melanoma_ml.echo import echo
from melanoma_ml.errors import InputValueError
from melanoma_ml.missing import is_missing, text_key

UNKNOWN = "unknown"
"""What the UI shows for a metadata field left empty; missing by ``melanoma_ml.missing``, as in training."""

CAM_METHODS = ("eigencam", "gradcam")
NO_CAM = "none"

METADATA_FIELDS = ("age", "sex", "site")
"""A request's metadata fields, in the order ``parse_metadata`` reads (and reports) them."""


class InvalidRequest(InputValueError):
    """The request cannot be answered as given; the message says what to change."""


def parse_metadata(
    age: Any,
    sex: Any,
    site: Any,
    *,
    vocabulary: Mapping[str, Sequence[str]],
    min_age: float,
    max_age: float,
) -> dict[str, Any]:
    """``{"age", "sex", "site"}`` as the model encodes them (None = missing), each value validated.

    Args:
        age, sex, site: As given (numbers or text; None, "", "unknown" and NaN are missing).
        vocabulary: The model's categories, ``{"sex": [...], "site": [...]}`` (``encoder.vocabulary``).
        min_age, max_age: The accepted age range (``serving.min_age``/``serving.max_age``).

    Raises:
        InvalidRequest: the first field (age, sex, site) that is refused, with what to change.
    """
    parsers = _field_parsers(vocabulary, min_age, max_age)
    given = {"age": age, "sex": sex, "site": site}
    return {field: parsers[field](given[field]) for field in METADATA_FIELDS}


def parse_metadata_leniently(
    age: Any,
    sex: Any,
    site: Any,
    *,
    vocabulary: Mapping[str, Sequence[str]],
    min_age: float,
    max_age: float,
) -> tuple[dict[str, Any], list[str]]:
    """``parse_metadata``, but a refused field is set missing instead of refusing the whole request.

    Batch scoring (``melanoma-ml predict``, ``batch_scores``) reads every row with this: a value the app
    refuses is encoded as missing, exactly as training's cleaning encodes an unrecognized value, and the
    app's message is returned so the row can say so (the scores table's ``warning`` column).

    Returns:
        The metadata (refused fields None) and one message per refused field, in field order.
    """
    parsers = _field_parsers(vocabulary, min_age, max_age)
    given = {"age": age, "sex": sex, "site": site}
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for field in METADATA_FIELDS:
        try:
            parsed[field] = parsers[field](given[field])
        except InvalidRequest as exc:
            parsed[field] = None
            problems.append(f"{exc}; scored with {field} missing")
    return parsed, problems


def _field_parsers(
    vocabulary: Mapping[str, Sequence[str]], min_age: float, max_age: float
) -> dict[str, Callable[[Any], Any]]:
    return {
        "age": lambda value: parse_age(value, min_age, max_age),
        "sex": lambda value: parse_category(value, vocabulary["sex"], "sex"),
        "site": lambda value: parse_category(value, vocabulary["site"], "anatomic site"),
    }


def parse_age(value: Any, min_age: float, max_age: float) -> float | None:
    """A validated age in years, or None for unknown.

    After validation the cleaning rule applies (``ages.normalize_age``): 0, ISIC's code for unknown, means
    unknown, and an age above ``schema.MAX_AGE`` is encoded as that cap, as in training.

    Raises:
        InvalidRequest: not a number, or outside ``[min_age, max_age]``.
    """
    if is_missing(value):
        return None
    if isinstance(value, bool):
        raise InvalidRequest(
            f"age must be a number of years, got {echo(value)}; enter e.g. 45 or leave it empty"
        )
    try:
        age = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"age must be a number of years, got {echo(value)}; enter e.g. 45 or leave it empty if unknown"
        ) from None
    if not math.isfinite(age) or not min_age <= age <= max_age:
        raise InvalidRequest(
            f"age {echo(value)} is outside {min_age:g}-{max_age:g} years; enter the patient's age or leave it empty"
        )
    return normalize_age(age)[0]


def age_hint(min_age: float, max_age: float) -> str:
    """The age field's placeholder: the accepted range and what means unknown (as ``parse_age`` reads it)."""
    unknown = "empty or 0 if unknown" if min_age <= 0 else "empty if unknown"
    return f"{min_age:g}-{max_age:g}; {unknown}; over {schema.MAX_AGE} counts as {schema.MAX_AGE}"


def parse_category(value: Any, choices: Sequence[str], what: str) -> str | None:
    """A category from the model's vocabulary (case-insensitive), or None for unknown.

    Raises:
        InvalidRequest: a value the model was not trained with (the message lists the choices).
    """
    key = text_key(value)
    if key is None:
        return None
    if key not in choices:
        raise InvalidRequest(
            f"unknown {what} {echo(value)}; choose one of {sorted(choices)} or leave it empty ({UNKNOWN!r})"
        )
    return key


def parse_tabular(
    value: Mapping[str, Any] | str | None, columns: Sequence[str]
) -> dict[str, float | None] | None:
    """A request's tabular features as ``{column: number or None}`` over every one of ``columns``.

    ``value`` is a mapping or its JSON text; None, "" or ``{}`` leave every column missing, as does a
    column left out or given as None/""/"unknown" (the encoder then applies the training rule: the
    training median plus a missing flag). Returns None for a model without tabular features.

    Raises:
        InvalidRequest: not a JSON object, a column the model does not use, a value that is not a finite
            number, or tabular values for a model trained without them.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f'tabular features must be a JSON object like {{"tbp_lv_areaMM2": 3.2}}; got {echo(text)} '
                f"({exc.msg} at character {exc.pos})"
            ) from exc
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(
            f"tabular features must be an object mapping column names to numbers, got {type(value).__name__}"
        )
    if not columns:
        if value:
            raise InvalidRequest(
                f"this model uses no tabular features, but {sorted(map(str, value))} were given; leave them out"
            )
        return None
    unknown = sorted(str(k) for k in value if k not in columns)
    if unknown:
        raise InvalidRequest(
            f"unknown tabular features {[echo(k) for k in unknown]}; this model uses {list(columns)}"
        )
    out: dict[str, float | None] = {}
    for column in columns:
        raw = value.get(column)
        if is_missing(raw):
            out[column] = None
            continue
        try:
            number = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(raw, bool) or not math.isfinite(number):
            raise InvalidRequest(
                f"tabular feature {column} must be a finite number, got {echo(raw)}; enter a number or leave it out"
            )
        out[column] = number
    return out


def parse_cam_method(value: str | None, *, default: str) -> str | None:
    """``"eigencam"``/``"gradcam"``, or None for no CAM (``"none"``); None/"" uses ``default``.

    Raises:
        InvalidRequest: any other value.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        value = default
    key = str(value).strip().lower().replace("-", "")
    if key in {NO_CAM, "off"}:
        return None
    if key not in CAM_METHODS:
        raise InvalidRequest(
            f"unknown explanation method {echo(value)}; choose one of {[*CAM_METHODS, NO_CAM]}"
        )
    return key


def parse_target_layer(value: str | None, choices: Sequence[str]) -> str:
    """A CAM layer from ``choices``; None/"" picks the first (the backbone's default).

    Raises:
        InvalidRequest: a layer this backbone does not offer.
    """
    if value is None or not str(value).strip():
        return choices[0]
    name = str(value).strip()
    if name not in choices:
        raise InvalidRequest(
            f"unknown CAM target layer {echo(name)} for this model (or one whose feature map is too coarse at the "
            f"model's input size); choose one of {list(choices)} or leave it empty for the default"
        )
    return name
