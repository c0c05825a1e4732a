"""The synthetic demo data written in the ISIC 2024 (SLICE-3D) layout: ``train-metadata.csv`` + ``train-image.hdf5``.

Same patients, lesions, labels and pixels as ``melanoma_ml.synthetic`` for a config (its ``plan_dataset`` and
``render_view``); only the files differ: each image is stored as its JPEG bytes in ``train-image.hdf5`` under
its ``isic_id`` (a scalar ``np.void``, as h5py reads ISIC's own file), and the table has ISIC 2024's columns.

The ``tbp_lv_*`` measurements (``config.TABULAR_PRESETS["isic2024_tbp"]``: the one list) are derived from the
lesion's ABCD features the renderer drew, plus noise, so they carry the same signal as the pixels: melanomas
are larger (``tbp_lv_areaMM2``, ``clin_size_long_diam_mm``), more varied in colour (``tbp_lv_color_std_mean``,
``tbp_lv_norm_color``), more ragged (``tbp_lv_norm_border``) and less symmetric (higher
``tbp_lv_symm_2axis``: ISIC scores asymmetry, higher = less symmetric), and the device's nevus confidence is
lower. The field of view of a tile is taken as 15 mm (ISIC 2024 crops are 15 x 15 mm).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from melanoma_ml import __version__, schema
from melanoma_ml.atomic import atomic_directory, atomic_write_json, atomic_write_text
from melanoma_ml.config import TABULAR_PRESETS, SyntheticConfig
from melanoma_ml.errors import InputValueError
from melanoma_ml.synthetic import (
    LesionSpec,
    _patient_skin_tones,
    plan_dataset,
    read_manifest,
    refuse_foreign_folder,
    render_view,
)

GENERATOR_VERSION = 1
CSV_NAME = "train-metadata.csv"
HDF5_NAME = "train-image.hdf5"
MANIFEST_NAME = "manifest.json"
TBP_COLUMNS: tuple[str, ...] = TABULAR_PRESETS["isic2024_tbp"]
FIELD_MM = 15.0
"""Side of an ISIC 2024 tile in millimetres: lesion sizes are the rendered radius times this."""

_JPEG_QUALITY = 90
_SITE_2024 = {
    "torso": ("posterior torso", "anterior torso"),
    "lower extremity": ("lower extremity",),
    "upper extremity": ("upper extremity",),
    "head/neck": ("head/neck",),
    "palms/soles": ("lower extremity",),
    "oral/genital": ("anterior torso",),
}
_LOCATION = {
    "posterior torso": ("Torso Back Top Third", "Torso Back"),
    "anterior torso": ("Torso Front Top Half", "Torso Front"),
    "lower extremity": ("Left Leg - Lower", "Left Leg"),
    "upper extremity": ("Right Arm - Upper", "Right Arm"),
    "head/neck": ("Head & Neck", "Head & Neck"),
}
_MELANOMA_IDDX = ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive")
_BENIGN_IDDX = ("Benign", "Benign melanocytic proliferations", "Nevus")
_OWN_ENTRIES = {CSV_NAME, HDF5_NAME, MANIFEST_NAME}


@dataclass(frozen=True)
class SyntheticISIC2024:
    """A generated ISIC 2024-layout dataset: ``root`` with ``csv_path`` and ``hdf5_path``."""

    root: Path
    csv_path: Path
    hdf5_path: Path
    n_images: int
    n_patients: int
    n_melanoma: int


def generate_isic2024_dataset(out_dir: str | Path, config: SyntheticConfig) -> SyntheticISIC2024:
    """Generate (or reuse, when its manifest matches ``config``) the synthetic set in the ISIC 2024 layout.

    Raises:
        InputValueError: ``out_dir`` holds files a generated set would not (never deleted).
    """
    import h5py

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if (
        manifest is not None
        and manifest.get("generator") == __name__
        and manifest.get("generator_version") == GENERATOR_VERSION
        and manifest.get("config") == config.model_dump(mode="json")
        and (out_dir / CSV_NAME).is_file()
        and (out_dir / HDF5_NAME).is_file()
    ):
        return _dataset(out_dir, manifest)
    refuse_foreign_folder(out_dir, _OWN_ENTRIES)
    plan, _artifacts, lesions, views = plan_dataset(config)
    table = isic2024_table(plan, lesions, config.seed)
    tones = _patient_skin_tones(plan[schema.PATIENT], config.seed)
    with atomic_directory(out_dir) as tmp:
        with h5py.File(tmp / HDF5_NAME, "w") as store:
            for i, name in enumerate(table["isic_id"]):
                rgb, _mask = render_view(lesions[i], views[i], tones[i], config.image_size, config.domain)
                buffer = io.BytesIO()
                Image.fromarray(rgb).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
                store.create_dataset(name, data=np.void(buffer.getvalue()))
        atomic_write_text(tmp / CSV_NAME, table.to_csv(index=False))
        manifest = {
            "generator": __name__,
            "generator_version": GENERATOR_VERSION,
            "package_version": __version__,
            "config": config.model_dump(mode="json"),
            "n_images": len(table),
            "n_patients": int(table["patient_id"].nunique()),
            "n_melanoma": int(plan[schema.TARGET].sum()),
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)  # written last: marks completion
    return _dataset(out_dir, manifest)


def isic2024_table(plan: pd.DataFrame, lesions: list[LesionSpec], seed: int) -> pd.DataFrame:
    """ISIC 2024 ``train-metadata.csv`` columns for a ``plan_dataset`` table and its lesions (one per row)."""
    rng = np.random.default_rng([seed, 2024])
    n = len(plan)
    target = plan[schema.TARGET].to_numpy().astype(int)
    feats = {k: np.array([getattr(s, k) for s in lesions]) for k in ("asymmetry", "border", "variegation")}
    dark = np.array([s.darkness for s in lesions])
    radius_mm = np.array([s.radius for s in lesions]) * FIELD_MM
    noise = lambda scale: rng.normal(0.0, scale, n)  # noqa: E731 - one draw per row, in a fixed order

    long_diam = 2 * radius_mm * (1 + 0.35 * feats["asymmetry"]) * np.exp(noise(0.08))
    area = np.pi * radius_mm**2 * (1 + 0.25 * feats["asymmetry"]) * np.exp(noise(0.10))
    perimeter = 2 * np.sqrt(np.pi * area) * (1 + 0.6 * feats["border"]) * np.exp(noise(0.05))
    minor = np.minimum(long_diam, 2 * np.sqrt(area / np.pi) * (1 - 0.3 * feats["asymmetry"]))
    skin_l = 62 + noise(4.0)
    lesion_l = skin_l - 8 - 22 * dark + noise(2.0)
    skin_a, lesion_a = 14 + noise(2.0), 19 + 6 * dark + noise(2.0)
    skin_b, lesion_b = 24 + noise(2.5), 27 + 4 * dark + noise(2.5)
    sites = [_site_2024(s, rng) for s in plan[schema.SITE]]
    table = pd.DataFrame(
        {
            "isic_id": [f"ISIC_{9_000_000 + i:07d}" for i in range(n)],
            "target": target,
            "patient_id": plan[schema.PATIENT].str.replace("SYNP_", "IP_", regex=False),
            "age_approx": plan[schema.AGE],
            "sex": plan[schema.SEX],
            "anatom_site_general": sites,
            "clin_size_long_diam_mm": np.round(long_diam, 2),
            "image_type": "TBP tile: close-up",
            "tbp_tile_type": np.where(rng.random(n) < 0.7, "3D: XP", "3D: white"),
            "tbp_lv_A": lesion_a,
            "tbp_lv_Aext": skin_a,
            "tbp_lv_B": lesion_b,
            "tbp_lv_Bext": skin_b,
            "tbp_lv_C": np.hypot(lesion_a, lesion_b),
            "tbp_lv_Cext": np.hypot(skin_a, skin_b),
            "tbp_lv_H": np.degrees(np.arctan2(lesion_b, lesion_a)),
            "tbp_lv_Hext": np.degrees(np.arctan2(skin_b, skin_a)),
            "tbp_lv_L": lesion_l,
            "tbp_lv_Lext": skin_l,
            "tbp_lv_areaMM2": area,
            "tbp_lv_area_perim_ratio": perimeter**2 / area,
            "tbp_lv_color_std_mean": np.clip(0.3 + 3.5 * feats["variegation"] + noise(0.4), 0, None),
            "tbp_lv_deltaA": lesion_a - skin_a,
            "tbp_lv_deltaB": lesion_b - skin_b,
            "tbp_lv_deltaL": lesion_l - skin_l,
            "tbp_lv_deltaLB": np.hypot(lesion_l - skin_l, lesion_b - skin_b),
            "tbp_lv_deltaLBnorm": np.clip(5 + 10 * dark + noise(1.0), 0, None),
            "tbp_lv_eccentricity": np.clip(0.45 + 0.45 * feats["asymmetry"] + noise(0.05), 0, 0.99),
            "tbp_lv_location": [_LOCATION.get(s, ("Unknown", "Unknown"))[0] for s in sites],
            "tbp_lv_location_simple": [_LOCATION.get(s, ("Unknown", "Unknown"))[1] for s in sites],
            "tbp_lv_minorAxisMM": minor,
            "tbp_lv_nevi_confidence": np.clip(100 * (1 - feats["border"]) * np.exp(noise(0.3)), 0, 100),
            "tbp_lv_norm_border": np.clip(10 * feats["border"] + noise(0.8), 0, 10),
            "tbp_lv_norm_color": np.clip(10 * feats["variegation"] + noise(0.8), 0, 10),
            "tbp_lv_perimeterMM": perimeter,
            "tbp_lv_radial_color_std_max": np.clip(0.2 + 3 * feats["variegation"] + noise(0.4), 0, None),
            "tbp_lv_stdL": np.clip(1 + 3 * feats["variegation"] + noise(0.3), 0, None),
            "tbp_lv_stdLExt": np.clip(1.5 + noise(0.3), 0, None),
            "tbp_lv_symm_2axis": np.clip(0.15 + 0.6 * feats["asymmetry"] + noise(0.05), 0, 1),
            "tbp_lv_symm_2axis_angle": (rng.integers(0, 36, n) * 5).astype("int64"),
            "tbp_lv_x": noise(150.0),
            "tbp_lv_y": rng.uniform(0, 1700, n),
            "tbp_lv_z": noise(60.0),
            "tbp_lv_dnn_lesion_confidence": np.clip(100 - np.abs(noise(8.0)), 0, 100),
            "attribution": "Synthetic (melanoma_ml)",
            "copyright_license": "CC-0",
        }
    )
    table = _with_diagnoses(table, plan, target)
    missing = [c for c in TBP_COLUMNS if c not in table.columns]
    if missing:  # the preset list grew: the generator must learn the new columns
        raise InputValueError(
            f"synthetic ISIC 2024 generator does not emit {missing}; add them to isic2024_table"
        )
    return table


def _with_diagnoses(table: pd.DataFrame, plan: pd.DataFrame, target: np.ndarray) -> pd.DataFrame:
    """``lesion_id`` (only malignant lesions have one, as in ISIC 2024), ``iddx_*`` and the melanoma fields."""
    melanoma = target == 1
    iddx = np.array([_MELANOMA_IDDX if m else _BENIGN_IDDX for m in melanoma], dtype=object)
    out = table.assign(
        lesion_id=np.where(melanoma, plan[schema.LESION].str.replace("SYNL_", "IL_", regex=False), ""),
        iddx_full=["::".join(levels) for levels in iddx],
        iddx_1=[levels[0] for levels in iddx],
        iddx_2=[levels[1] for levels in iddx],
        iddx_3=[levels[2] for levels in iddx],
        iddx_4="",
        iddx_5="",
        mel_mitotic_index=np.where(melanoma, "<1/mm^2", ""),
        mel_thick_mm=np.where(melanoma, np.round(0.2 + np.arange(len(table)) % 7 * 0.1, 2), np.nan),
    )
    first = ["isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general"]
    return out[[*first, *[c for c in out.columns if c not in first]]]


def _site_2024(site: Any, rng: np.random.Generator) -> str:
    """An ISIC 2020 site in ISIC 2024's vocabulary (the torso is split front/back); blank stays blank."""
    if not isinstance(site, str):
        return ""
    choices = _SITE_2024[site]
    return choices[int(rng.integers(len(choices)))]


def _dataset(root: Path, manifest: dict[str, Any]) -> SyntheticISIC2024:
    return SyntheticISIC2024(
        root=root,
        csv_path=root / CSV_NAME,
        hdf5_path=root / HDF5_NAME,
        n_images=int(manifest["n_images"]),
        n_patients=int(manifest["n_patients"]),
        n_melanoma=int(manifest["n_melanoma"]),
    )
