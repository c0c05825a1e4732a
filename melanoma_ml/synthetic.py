"""Synthetic dermoscopy demo data in the ISIC 2020 layout, so the whole pipeline runs without downloads.

The generator is deterministic (``SyntheticConfig.seed``) and fast (numpy + PIL, ~20 ms per 512 px image).
What it models:

* **Metadata** with ISIC 2020-like marginals: ~52% male, ages in steps of 5 (10..85) with melanoma patients
  ~10 years older, the ISIC site mix (torso ~50%, lower extremity ~25%, ...), a few % blanks, several
  images per patient, some lesions imaged twice (same ``lesion_id``).
* **Lesions** whose look follows the ABCD rule. Every lesion draws four continuous features (asymmetry,
  border irregularity, colour variegation, diameter) from class-dependent distributions that overlap:
  melanomas tend to be large, lobed, ragged and multi-coloured (dark brown, black, blue-grey, red); benign
  lesions tend to be small, round and one light-medium brown, but atypical nevi and small melanomas exist.
  The renderer never sees the label, only the features, so the label is learnable but not trivial.
* **Distractors** that are NOT correlated with the label: hair, a ruler scale at one edge, dark vignette
  corners and gel bubbles, drawn from their own random stream with the same probability for both
  classes and recorded in ``artifacts.csv``, so a test (and a curious user) can check that.
* **A domain** (``SyntheticConfig.domain``, ``melanoma_ml.config.SyntheticDomain``): the acquisition look
  of the clinic: colour cast, lens magnification, blur, sensor noise and the vignette and hair rates. The
  default is the look above, pixel for pixel. ``SYNTHETIC_DOMAINS["second_clinic"]`` renders the same
  patients, lesions and labels (same seed) with a shifted look, for domain-shift and out-of-distribution
  studies (``benchmarks/ood_detection.py``). The vignette and hair rates move the threshold on the same
  random draw, so every other distractor and every view stays the same image for image.

Output layout (``out_dir``): ``train.csv``, ``artifacts.csv``, ``jpeg/train/<image_name>.jpg``,
``masks/<image_name>.png`` (uint8 0/255 lesion mask) and ``manifest.json``. The folder is built in a temp
folder and renamed into place, so readers never see half a dataset; ``manifest.json`` marks it complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from melanoma_ml import __version__, schema
from melanoma_ml.atomic import atomic_directory, atomic_write_json, atomic_write_text
from melanoma_ml.config import SyntheticConfig, SyntheticDomain
from melanoma_ml.errors import InputValueError

GENERATOR_VERSION = 1
"""Bump when the rendering or the metadata model changes: existing synthetic folders are then rebuilt."""

CSV_NAME = "train.csv"
ARTIFACTS_NAME = "artifacts.csv"
MANIFEST_NAME = "manifest.json"
IMAGE_SUBDIR = Path("jpeg") / "train"
MASK_SUBDIR = Path("masks")
ARTIFACT_KINDS: tuple[str, ...] = ("hair", "ruler", "vignette", "bubbles")

# --- the data model: ISIC 2020 marginals (measured on ISIC_2020_Training_GroundTruth_v2.csv) ------------
_SEX_P = {"male": 0.52, "female": 0.46}  # remainder: blank
_MISSING_AGE_P = 0.02
_AGE_MEAN = {0: 48.0, 1: 58.0}  # patients without / with a melanoma
_AGE_SD = 14.0
_AGE_STEP, _AGE_MIN, _AGE_MAX = 5, 10, schema.MAX_AGE
_SITE_P = {
    "torso": 0.50,
    "lower extremity": 0.25,
    "upper extremity": 0.15,
    "head/neck": 0.06,
    "palms/soles": 0.015,
    "oral/genital": 0.01,
}  # remainder (~1.5%): blank
_BENIGN_DIAGNOSIS_P = {"unknown": 0.78, "nevus": 0.18, "seborrheic keratosis": 0.025, "lentigo NOS": 0.015}
_REPEAT_VIEW_P = 0.15  # chance that a patient's next image re-images one of their earlier lesions
_JPEG_QUALITY = 90

# --- ABCD features: Beta(a, b) per class; the overlap is deliberate ------------------------------------
_FEATURE_BETA = {
    "asymmetry": {0: (1.5, 5.0), 1: (4.0, 2.5)},
    "border": {0: (1.5, 5.0), 1: (4.0, 2.0)},
    "variegation": {0: (1.3, 6.0), 1: (4.0, 2.0)},
    "darkness": {0: (2.0, 3.0), 1: (3.5, 2.0)},
}
_RADIUS_RANGE = {0: (0.09, 0.20), 1: (0.15, 0.30)}  # lesion radius as a fraction of the image side
_SMALL_MELANOMA_P = 0.15  # these melanomas take a benign-sized radius
_SMALL_MELANOMA_RADIUS = (0.09, 0.16)
_ARTIFACT_P = {"ruler": 0.20, "bubbles": 0.25}  # hair and vignette rates belong to SyntheticDomain

# --- colours (RGB) ---------------------------------------------------------------------------------------
_SKIN_LIGHT = np.array([236, 200, 188], np.float32)
_SKIN_DARK = np.array([170, 120, 95], np.float32)
_BROWN_LIGHT = np.array([176, 122, 86], np.float32)
_BROWN_DARK = np.array([96, 58, 38], np.float32)
_EXTRA_COLOURS = np.array(
    [
        [40, 28, 28],  # black
        [98, 104, 128],  # blue-grey (regression / veil)
        [168, 72, 70],  # red (vascular)
        [78, 44, 30],  # dark brown
        [190, 140, 110],  # light brown / tan
    ],
    np.float32,
)

_LESION_OPACITY = 0.93  # a little skin texture shows through the pigment
_LESION_OPACITY_LUT = [round(v * _LESION_OPACITY) for v in range(256)]
_GRAIN_MEAN = 240.0  # grain is stored as uint8 around this value and applied with ImageChops.multiply
_ANGLE_BINS = 720
_WORK_SIDE = 256  # lesion geometry is drawn at most at this size, then upscaled smoothly
_DEFAULT_DOMAIN = SyntheticDomain()


@dataclass(frozen=True)
class SyntheticDataset:
    """A generated dataset on disk.

    Attributes:
        root: the output folder.
        csv_path: ``train.csv`` (ISIC 2020 columns).
        image_dir: folder of ``<image_name>.jpg``.
        mask_dir: folder of ``<image_name>.png`` lesion masks (0/255).
        n_images: rows in ``train.csv``.
        n_patients: distinct ``patient_id``.
        n_melanoma: images with ``target == 1``.
        artifacts_path: ``artifacts.csv`` (image_name + one 0/1 column per distractor kind).
    """

    root: Path
    csv_path: Path
    image_dir: Path
    mask_dir: Path
    n_images: int
    n_patients: int
    n_melanoma: int
    artifacts_path: Path


@dataclass(frozen=True)
class LesionSpec:
    """What a lesion looks like; the renderer sees these features, never the label."""

    radius: float
    asymmetry: float
    border: float
    variegation: float
    darkness: float
    shape_seed: int


@dataclass(frozen=True)
class ViewSpec:
    """One photograph of a lesion: placement, distractors and the seed of its texture noise."""

    rotation: float
    shift: tuple[float, float]
    zoom: float
    artifacts: dict[str, bool]
    seed: int


def generate_synthetic_dataset(out_dir: str | Path, config: SyntheticConfig) -> SyntheticDataset:
    """Generate (or reuse) the synthetic demo dataset in ``out_dir``.

    If ``out_dir`` already holds a complete dataset made with the same config and generator version, it is
    returned untouched. A folder without a matching ``manifest.json`` (partial or older) is rebuilt.

    Raises:
        ValueError: ``config.images_per_patient`` is not a valid range, or ``out_dir`` holds files that are
            not part of a synthetic dataset (we never delete foreign files).
    """
    out_dir = Path(out_dir)
    low, high = config.images_per_patient
    if not 1 <= low <= high:
        raise InputValueError(
            f"synthetic.images_per_patient must be an inclusive range (low, high) with 1 <= low <= high, "
            f"got {config.images_per_patient}; e.g. (2, 6)"
        )
    existing = _reusable(out_dir, config)
    if existing is not None:
        return existing
    refuse_foreign_folder(out_dir)

    table, artifacts, lesions, views = plan_dataset(config)
    with atomic_directory(out_dir) as tmp:
        image_dir, mask_dir = tmp / IMAGE_SUBDIR, tmp / MASK_SUBDIR
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        skin_tones = _patient_skin_tones(table[schema.PATIENT], config.seed)
        for i, name in enumerate(table[schema.IMAGE]):
            rgb, mask = render_view(lesions[i], views[i], skin_tones[i], config.image_size, config.domain)
            Image.fromarray(rgb).save(image_dir / f"{name}.jpg", quality=_JPEG_QUALITY)
            Image.fromarray(mask).save(mask_dir / f"{name}.png", compress_level=1)
        atomic_write_text(tmp / CSV_NAME, table.to_csv(index=False))
        atomic_write_text(tmp / ARTIFACTS_NAME, artifacts.to_csv(index=False))
        atomic_write_json(tmp / MANIFEST_NAME, _manifest(config, table))  # written last: marks completion
    return _dataset(out_dir, table)


def plan_dataset(
    config: SyntheticConfig,
) -> tuple[pd.DataFrame, pd.DataFrame, list[LesionSpec], list[ViewSpec]]:
    """Draw the metadata, lesion features and per-image views (no pixels). Deterministic in ``config``.

    Returns:
        (train table in ISIC 2020 columns, artifacts table, one LesionSpec per row, one ViewSpec per row).
    """
    rng = np.random.default_rng([config.seed, 0])
    low, high = config.images_per_patient
    images_per_patient = rng.integers(low, high + 1, size=config.n_patients)

    # Which lesion each image shows: mostly new lesions, sometimes a second view of an earlier one.
    image_patient: list[int] = []
    image_lesion: list[int] = []
    lesion_patient: list[int] = []
    for patient, count in enumerate(images_per_patient):
        own: list[int] = []
        for _ in range(count):
            if own and rng.random() < _REPEAT_VIEW_P:
                lesion = int(rng.choice(own))
            else:
                lesion = len(lesion_patient)
                lesion_patient.append(patient)
                own.append(lesion)
            image_patient.append(patient)
            image_lesion.append(lesion)
    n_lesions = len(lesion_patient)

    # Exactly round(rate * lesions) melanomas (at least one of each class), so small demos stay usable.
    n_melanoma = int(np.clip(round(config.melanoma_rate * n_lesions), 1, n_lesions - 1))
    lesion_target = np.zeros(n_lesions, dtype=int)
    lesion_target[rng.choice(n_lesions, size=n_melanoma, replace=False)] = 1
    patient_has_melanoma = np.zeros(config.n_patients, dtype=int)
    np.maximum.at(patient_has_melanoma, np.asarray(lesion_patient), lesion_target)

    sexes = _draw_categories(rng, _SEX_P, config.n_patients)
    ages = _draw_ages(rng, patient_has_melanoma)
    sites = _draw_categories(rng, _SITE_P, n_lesions)
    benign_dx = _draw_categories(rng, _BENIGN_DIAGNOSIS_P, n_lesions)
    lesion_specs = [_draw_lesion(rng, int(t)) for t in lesion_target]

    width = max(4, len(str(config.n_patients)))
    lesion_width = max(5, len(str(n_lesions)))
    patients = np.asarray(image_patient)
    lesions = np.asarray(image_lesion)
    targets = lesion_target[lesions]
    table = pd.DataFrame(
        {
            schema.IMAGE: [f"SYN_{i + 1:07d}" for i in range(len(lesions))],
            schema.PATIENT: [f"SYNP_{p + 1:0{width}d}" for p in patients],
            schema.LESION: [f"SYNL_{lesion + 1:0{lesion_width}d}" for lesion in lesions],
            schema.SEX: sexes[patients],
            schema.AGE: ages[patients],
            schema.SITE: sites[lesions],
            schema.DIAGNOSIS: np.where(targets == 1, "melanoma", benign_dx[lesions]),
            schema.BENIGN_MALIGNANT: np.where(targets == 1, "malignant", "benign"),
            schema.TARGET: targets,
        }
    )

    # Views and distractors come from their own stream: independent of the label by construction.
    view_rng = np.random.default_rng([config.seed, 1])
    rates = {**_ARTIFACT_P, "hair": config.domain.hair_rate, "vignette": config.domain.vignette_rate}
    seen: set[int] = set()
    views = []
    for lesion in lesions.tolist():
        views.append(_draw_view(view_rng, rates, first=lesion not in seen))
        seen.add(lesion)
    artifacts = pd.DataFrame({schema.IMAGE: table[schema.IMAGE]})
    for kind in ARTIFACT_KINDS:
        artifacts[kind] = [int(v.artifacts[kind]) for v in views]
    return table, artifacts, [lesion_specs[lesion] for lesion in lesions], views


def render_view(
    lesion: LesionSpec,
    view: ViewSpec,
    skin: np.ndarray,
    size: int,
    domain: SyntheticDomain = _DEFAULT_DOMAIN,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one dermoscopy-like image and its lesion mask.

    Args:
        domain: The acquisition look; the lesion is magnified by ``domain.scale`` (so is its mask), and
            blur, colour cast and noise are applied to the finished photograph (``_acquire``).

    Returns:
        (rgb (size, size, 3) uint8, mask (size, size) uint8 with 0 = skin, 255 = lesion).
    """
    rng = np.random.default_rng(view.seed)
    if domain.scale != 1.0:
        view = replace(view, zoom=view.zoom * domain.scale)
    work = min(size, _WORK_SIDE)
    coverage, shade = _lesion_geometry(lesion, view, work)
    # Colour varies slowly: draw it at half the geometry resolution; one resize brings both to full size.
    colour_shade = shade[::2, ::2] if work >= 32 else shade
    colour = Image.fromarray(
        _lesion_colours(lesion, colour_shade, np.random.default_rng([lesion.shape_seed, 1]))
    )
    # Soften the edge at the working resolution (cheap), then upscale; the mask is the 50% contour.
    coverage_img = Image.fromarray(coverage, mode="L").filter(
        ImageFilter.GaussianBlur(max(0.6, work * 0.005))
    )
    if coverage_img.size != (size, size):
        coverage_img = coverage_img.resize((size, size), Image.Resampling.BILINEAR)
    if colour.size != (size, size):
        colour = colour.resize((size, size), Image.Resampling.BICUBIC)
    mask = np.where(np.asarray(coverage_img) >= 128, 255, 0).astype(np.uint8)
    alpha = coverage_img.point(_LESION_OPACITY_LUT)

    img = Image.composite(colour, _skin(skin, rng, size), alpha)
    if view.artifacts["vignette"]:
        img = ImageChops.multiply(img, _vignette(size))
    draw = ImageDraw.Draw(img)
    if view.artifacts["hair"]:
        _draw_hair(draw, rng, size)
    if view.artifacts["ruler"]:
        _draw_ruler(draw, rng, size)
    if view.artifacts["bubbles"]:
        _draw_bubbles(draw, rng, size)
    if domain != _DEFAULT_DOMAIN:
        img = _acquire(img, domain, np.random.default_rng([view.seed, 1]))
    return np.asarray(img), mask


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a synthetic folder, or None when it has none (incomplete or not ours)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # an unreadable manifest means "not complete": the folder is rebuilt
    return manifest if isinstance(manifest, dict) else None


# --- metadata draws --------------------------------------------------------------------------------------


def _draw_categories(rng: np.random.Generator, probabilities: dict[str, float], n: int) -> np.ndarray:
    """Draw ``n`` labels; the probability mass not in ``probabilities`` becomes blank (NaN)."""
    labels = [*probabilities, None]
    p = np.array([*probabilities.values(), max(0.0, 1.0 - sum(probabilities.values()))])
    drawn = rng.choice(len(labels), size=n, p=p / p.sum())
    return np.array([labels[i] if labels[i] is not None else np.nan for i in drawn], dtype=object)


def _draw_ages(rng: np.random.Generator, has_melanoma: np.ndarray) -> np.ndarray:
    means = np.where(has_melanoma == 1, _AGE_MEAN[1], _AGE_MEAN[0])
    ages = np.round(rng.normal(means, _AGE_SD) / _AGE_STEP) * _AGE_STEP
    ages = np.clip(ages, _AGE_MIN, _AGE_MAX).astype(float)
    ages[rng.random(len(ages)) < _MISSING_AGE_P] = np.nan
    return ages


def _draw_lesion(rng: np.random.Generator, target: int) -> LesionSpec:
    features = {name: float(rng.beta(*ab[target])) for name, ab in _FEATURE_BETA.items()}
    radius_range = _RADIUS_RANGE[target]
    if target == 1 and rng.random() < _SMALL_MELANOMA_P:
        radius_range = _SMALL_MELANOMA_RADIUS
    return LesionSpec(
        radius=float(rng.uniform(*radius_range)), shape_seed=int(rng.integers(2**31)), **features
    )


def _draw_view(rng: np.random.Generator, rates: dict[str, float], *, first: bool) -> ViewSpec:
    """Placement of one photograph; a repeat view of a lesion is shifted and zoomed a little more.

    ``rates`` is the chance of each distractor kind; each kind always consumes one draw, so changing a rate
    changes only that kind's flags, never the rest of the stream.
    """
    spread = 0.04 if first else 0.08
    return ViewSpec(
        rotation=float(rng.uniform(0, 2 * np.pi)),
        shift=(float(rng.uniform(-spread, spread)), float(rng.uniform(-spread, spread))),
        zoom=float(rng.uniform(0.92, 1.08)),
        artifacts={kind: bool(rng.random() < rates[kind]) for kind in ARTIFACT_KINDS},
        seed=int(rng.integers(2**31)),
    )


def _patient_skin_tones(patients: pd.Series, seed: int) -> list[np.ndarray]:
    """One skin colour per patient (mostly light, as in ISIC), shared by all their images."""
    rng = np.random.default_rng([seed, 2])
    codes, uniques = pd.factorize(patients)
    tones = [_SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * rng.beta(1.5, 5.0) for _ in uniques]
    return [tones[c] for c in codes]


# --- rendering -------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image-side units, centred on 0 (x as a row, y as a column)."""
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5).astype(np.float32)
    return coords[None, :], coords[:, None]


def _radius_profile(rng: np.random.Generator, radius: float, asymmetry: float, border: float) -> np.ndarray:
    """Lesion radius for ``_ANGLE_BINS`` angles: low harmonics for lopsidedness, high ones for a ragged edge."""
    theta = np.linspace(0, 2 * np.pi, _ANGLE_BINS, endpoint=False, dtype=np.float32)
    profile = np.ones_like(theta)
    for k in (2, 3):
        profile += 0.16 * asymmetry * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 25):
        amplitude = 0.10 * border * rng.uniform(0.2, 1.0) / np.sqrt(k - 3)
        profile += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return (radius * np.clip(profile, 0.35, None)).astype(np.float32)


def _blob(
    x: np.ndarray, y: np.ndarray, centre: tuple[float, float], profile: np.ndarray, rotation: float
) -> tuple[np.ndarray, np.ndarray]:
    """(inside mask, r / R(theta)) of an irregular blob with radius ``profile`` around ``centre``."""
    dx, dy = x - centre[0], y - centre[1]
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) - rotation
    bins = ((theta * (_ANGLE_BINS / (2 * np.pi))).astype(np.int32)) % _ANGLE_BINS
    relative = r / profile[bins]
    return relative < 1.0, relative


def _lesion_geometry(lesion: LesionSpec, view: ViewSpec, work: int) -> tuple[np.ndarray, np.ndarray]:
    """(coverage uint8 0/255, shade float in 0..1 that is 1 at the centre) at ``work`` x ``work`` pixels.

    Asymmetry adds off-centre lobes; the lesion's own seed fixes its shape across views.
    """
    rng = np.random.default_rng([lesion.shape_seed, 0])
    x, y = _grid(work)
    radius = lesion.radius * view.zoom
    cx, cy = view.shift
    inside, relative = _blob(
        x, y, (cx, cy), _radius_profile(rng, radius, lesion.asymmetry, lesion.border), view.rotation
    )
    shade = np.clip(1.0 - relative, 0.0, 1.0)
    n_lobes = int(round(lesion.asymmetry * 2.4))
    for _ in range(n_lobes):
        angle = rng.uniform(0, 2 * np.pi) + view.rotation
        distance = radius * rng.uniform(0.55, 0.9)
        lobe_radius = radius * rng.uniform(0.35, 0.6) * (0.5 + lesion.asymmetry)
        centre = (cx + distance * np.cos(angle), cy + distance * np.sin(angle))
        lobe_inside, lobe_relative = _blob(
            x, y, centre, _radius_profile(rng, lobe_radius, 0.3, lesion.border), view.rotation
        )
        inside |= lobe_inside
        shade = np.maximum(shade, 0.6 * np.clip(1.0 - lobe_relative, 0.0, 1.0))
    return np.where(inside, 255, 0).astype(np.uint8), shade


def _smooth_noise(rng: np.random.Generator, cells: int, size: int, count: int = 1) -> np.ndarray:
    """``count`` smooth random fields (count, size, size) in roughly 0..1, from a coarse grid upsampled."""
    fields = []
    for coarse in rng.random((count, cells, cells), dtype=np.float32):
        img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        fields.append(np.asarray(img))
    return np.stack(fields)


def _lesion_colours(lesion: LesionSpec, shade: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lesion colour image (side, side, 3) uint8 for a square ``shade`` map: one brown when variegation
    is low, soft patches of up to five colours (browns, black, blue-grey, red) when it is high."""
    work = shade.shape[0]
    base = _BROWN_LIGHT + (_BROWN_DARK - _BROWN_LIGHT) * lesion.darkness
    n_colours = 1 + int(lesion.variegation * 4.99)
    if n_colours == 1:
        colour = np.broadcast_to(base, (work, work, 3)).astype(np.float32)
    else:
        palette = np.vstack([base, _EXTRA_COLOURS[rng.permutation(len(_EXTRA_COLOURS))[: n_colours - 1]]])
        weights = np.array([1.6] + [1.0] * (n_colours - 1), np.float32)[:, None, None]  # base dominates
        patches = np.argmax(_smooth_noise(rng, 5, work, n_colours) * weights, axis=0)
        colour = palette[patches]
    # Darker towards the centre, plus fine mottling (pigment network stand-in).
    mottling = 1.0 + 0.10 * (_smooth_noise(rng, max(4, work // 8), work)[0] - 0.5)
    factor = (1.0 - 0.18 * shade) * mottling
    pixels = Image.fromarray(np.clip(colour * factor[..., None], 0, 255).astype(np.uint8))
    return np.asarray(pixels.filter(ImageFilter.GaussianBlur(work * 0.024)))  # soft patch boundaries


@lru_cache(maxsize=8)
def _grain(size: int) -> Image.Image:
    """A fixed fine-grain skin texture tile (RGB, ~±3% around ``_GRAIN_MEAN``); views shift it to vary it."""
    rng = np.random.default_rng(size)
    tile = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    blurred = np.asarray(tile.filter(ImageFilter.GaussianBlur(max(0.5, size / 400))), np.float32)
    grain = _GRAIN_MEAN * (1.0 + 0.03 * (blurred - blurred.mean()) / max(1e-6, float(blurred.std())))
    return Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _skin(tone: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """Skin background: the patient's tone under uneven lighting and redness, times a fine grain."""
    cells = 6
    lighting = 0.94 + 0.12 * rng.random((cells, cells, 1), dtype=np.float32)
    redness = np.ones((cells, cells, 3), np.float32)
    redness[..., 0] += 0.05 * (rng.random((cells, cells), dtype=np.float32) - 0.5)
    coarse = np.clip(tone * lighting * redness * (255.0 / _GRAIN_MEAN), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    shifted = ImageChops.offset(_grain(size), int(rng.integers(size)), int(rng.integers(size)))
    return ImageChops.multiply(smooth, shifted)  # a * b / 255


@lru_cache(maxsize=8)
def _vignette(size: int) -> Image.Image:
    """Dark corners outside the round dermoscope field, as an RGB multiply mask (white = unchanged)."""
    x, y = _grid(size)
    factor = np.clip(1.0 - (np.hypot(x, y) - 0.47) * 9.0, 0.1, 1.0)
    return Image.fromarray((factor * 255).astype(np.uint8), mode="L").convert("RGB")


def _acquire(img: Image.Image, domain: SyntheticDomain, rng: np.random.Generator) -> Image.Image:
    """The camera of a clinic: optical blur, then white balance (per-channel gain), then sensor noise.

    ``rng`` is the view's own acquisition stream, separate from the one that drew the scene.
    """
    size = img.size[0]
    if domain.blur_sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(domain.blur_sigma * size))
    pixels = np.asarray(img, np.float32) * np.asarray(domain.colour_cast, np.float32)
    if domain.noise_std > 0:
        pixels += rng.normal(0.0, domain.noise_std, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _draw_hair(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(2, 12))):
        start = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        length = size * rng.uniform(0.3, 0.9)
        bend = rng.uniform(-0.8, 0.8)
        t = np.linspace(0, 1, 16)
        angles = angle + bend * t
        steps = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (length / len(t))
        points = start + np.cumsum(steps, axis=0)
        grey = int(rng.integers(20, 70))  # dark, slightly purple-black hair
        width = max(1, int(round(size / 256 * rng.uniform(1.0, 2.5))))
        draw.line([tuple(p) for p in points], fill=(grey, grey - 5, grey), width=width)


def _draw_ruler(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """A millimetre scale along one edge: a baseline with short ticks and a long one every fifth."""
    edge = int(rng.integers(4))
    offset = size * rng.uniform(0.03, 0.07)
    step = max(2.0, size / rng.uniform(30, 45))
    tick = max(2.0, size * 0.02)
    ink = (30, 30, 30)
    width = max(1, size // 256)
    positions = np.arange(size * 0.1, size * 0.9, step)

    def place(along: float, across: float) -> tuple[float, float]:
        across = across if edge in (0, 1) else size - 1 - across
        return (along, across) if edge in (0, 2) else (across, along)

    draw.line([place(positions[0], offset), place(positions[-1], offset)], fill=ink, width=width)
    for i, along in enumerate(positions):
        length = tick * (2.0 if i % 5 == 0 else 1.0)
        draw.line([place(along, offset), place(along, offset + length)], fill=ink, width=width)


def _draw_bubbles(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(1, 6))):
        cx, cy = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.01, 0.05)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(235, 235, 235), width=max(1, size // 200))
        h = max(1.0, r * 0.25)
        hx, hy = cx - r * 0.4, cy - r * 0.4
        draw.ellipse([hx - h, hy - h, hx + h, hy + h], fill=(250, 250, 250))


# --- reuse and bookkeeping -------------------------------------------------------------------------------


def _manifest(config: SyntheticConfig, table: pd.DataFrame) -> dict[str, Any]:
    return {
        "generator": "melanoma_ml.synthetic",
        "generator_version": GENERATOR_VERSION,
        "package_version": __version__,
        "config": config.model_dump(mode="json"),
        "n_images": len(table),
        "n_patients": int(table[schema.PATIENT].nunique()),
        "n_lesions": int(table[schema.LESION].nunique()),
        "n_melanoma": int(table[schema.TARGET].sum()),
        "files": {
            "csv": CSV_NAME,
            "artifacts": ARTIFACTS_NAME,
            "images": str(IMAGE_SUBDIR),
            "masks": str(MASK_SUBDIR),
        },
    }


def _reusable(out_dir: Path, config: SyntheticConfig) -> SyntheticDataset | None:
    """The existing dataset when its manifest matches ``config`` and every listed file is present."""
    manifest = read_manifest(out_dir)
    if (
        manifest is None
        or manifest.get("generator_version") != GENERATOR_VERSION
        or _with_default_domain(manifest.get("config")) != config.model_dump(mode="json")
    ):
        return None
    csv_path = out_dir / CSV_NAME
    if not csv_path.is_file() or not (out_dir / ARTIFACTS_NAME).is_file():
        return None
    table = pd.read_csv(csv_path)
    if len(table) != manifest.get("n_images") or schema.IMAGE not in table:
        return None
    for name in table[schema.IMAGE]:
        if (
            not (out_dir / IMAGE_SUBDIR / f"{name}.jpg").is_file()
            or not (out_dir / MASK_SUBDIR / f"{name}.png").is_file()
        ):
            return None
    return _dataset(out_dir, table)


def _with_default_domain(stored: Any) -> Any:
    """A manifest config written before ``domain`` existed describes the default domain (same pixels)."""
    if isinstance(stored, dict) and "domain" not in stored:
        return {**stored, "domain": _DEFAULT_DOMAIN.model_dump(mode="json")}
    return stored


_OWN_ENTRIES = {CSV_NAME, ARTIFACTS_NAME, MANIFEST_NAME, IMAGE_SUBDIR.parts[0], MASK_SUBDIR.parts[0]}


def refuse_foreign_folder(out_dir: Path, own_entries: set[str] = _OWN_ENTRIES) -> None:
    """Rebuilding replaces ``out_dir``: refuse if it holds anything but ``own_entries`` (a generator's files)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputValueError(f"synthetic data folder {out_dir} is a file; choose a folder path")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own_entries)
    if foreign:
        raise InputValueError(
            f"synthetic data folder {out_dir} contains files that are not part of a synthetic dataset "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
            "choose an empty or new folder (the generator replaces the whole folder)"
        )


def _dataset(root: Path, table: pd.DataFrame) -> SyntheticDataset:
    return SyntheticDataset(
        root=root,
        csv_path=root / CSV_NAME,
        image_dir=root / IMAGE_SUBDIR,
        mask_dir=root / MASK_SUBDIR,
        n_images=len(table),
        n_patients=int(table[schema.PATIENT].nunique()),
        n_melanoma=int(table[schema.TARGET].sum()),
        artifacts_path=root / ARTIFACTS_NAME,
    )
