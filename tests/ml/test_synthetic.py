"""Synthetic demo data: realistic metadata, label-independent distractors, learnable lesions, reuse."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from melanoma_ml import schema, synthetic
from melanoma_ml.config import SYNTHETIC_DOMAINS, SyntheticConfig, SyntheticDomain, synthetic_domain
from melanoma_ml.images.io import load_rgb
from melanoma_ml.synthetic import ARTIFACT_KINDS, generate_synthetic_dataset, plan_dataset

ISIC_2020_COLUMNS = [
    "image_name",
    "patient_id",
    "lesion_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
]
TINY = SyntheticConfig(n_patients=8, images_per_patient=(2, 3), image_size=48, seed=3)


@pytest.fixture(scope="module")
def big_plan() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metadata of ~8,000 images (no pixels are drawn): enough to check marginals tightly."""
    table, artifacts, _, _ = plan_dataset(SyntheticConfig(n_patients=2000, seed=11))
    return table, artifacts


# --- metadata (no pixels) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "value", "low", "high"),
    [
        (schema.SEX, "male", 0.48, 0.56),
        (schema.SITE, "torso", 0.46, 0.54),
        (schema.SITE, "lower extremity", 0.22, 0.28),
        (schema.SITE, "upper extremity", 0.12, 0.18),
        (schema.SITE, "head/neck", 0.04, 0.08),
        (schema.SITE, "palms/soles", 0.005, 0.03),
        (schema.SITE, "oral/genital", 0.002, 0.02),
    ],
)
def test_metadata_marginals_look_like_isic_2020(big_plan, column, value, low, high):
    table, _ = big_plan
    share = (table[column] == value).mean()
    assert low <= share <= high, f"{column}={value}: {share:.3f}"


@pytest.mark.parametrize("column", [schema.SEX, schema.AGE, schema.SITE])
def test_a_few_percent_blanks(big_plan, column):
    missing = big_plan[0][column].isna().mean()
    assert 0.005 <= missing <= 0.05, f"{column}: {missing:.3f} missing"


def test_ages_melanoma_rate_and_labels(big_plan):
    table, _ = big_plan
    ages = table[schema.AGE].dropna()
    assert (ages % 5 == 0).all() and ages.between(10, 85).all()
    patient_melanoma = table.groupby(schema.PATIENT)[schema.TARGET].transform("max")
    older_by = ages[patient_melanoma == 1].mean() - ages[patient_melanoma == 0].mean()
    assert 5 <= older_by <= 15
    lesion_target = table.groupby(schema.LESION)[schema.TARGET].agg(["min", "max"])
    assert (lesion_target["min"] == lesion_target["max"]).all(), "a lesion has one label across its views"
    assert lesion_target["max"].mean() == pytest.approx(0.2, abs=0.01)
    melanoma = table[schema.TARGET] == 1
    assert (table.loc[melanoma, schema.DIAGNOSIS] == "melanoma").all()
    assert set(table.loc[~melanoma, schema.DIAGNOSIS]) == {
        "unknown",
        "nevus",
        "seborrheic keratosis",
        "lentigo NOS",
    }
    assert (table[schema.BENIGN_MALIGNANT] == np.where(melanoma, "malignant", "benign")).all()
    assert set(table[schema.SITE].dropna()) <= set(schema.SITES) and set(table[schema.SEX].dropna()) <= set(
        schema.SEXES
    )


def test_patients_have_several_images_and_constant_demographics(big_plan):
    table, _ = big_plan
    per_patient = table.groupby(schema.PATIENT)
    assert per_patient.size().between(2, 6).all()
    assert (per_patient[schema.SEX].nunique(dropna=False) == 1).all()
    assert (per_patient[schema.AGE].nunique(dropna=False) == 1).all()
    assert table[schema.LESION].nunique() < len(table), "some lesions are imaged more than once"
    assert (per_patient[schema.LESION].nunique() > 1).mean() > 0.8, "most patients have several lesions"


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_distractors_are_not_correlated_with_the_label(big_plan, kind):
    table, artifacts = big_plan
    assert (artifacts[schema.IMAGE] == table[schema.IMAGE]).all()
    by_class = artifacts[kind].groupby(table[schema.TARGET]).mean()
    assert 0.1 <= artifacts[kind].mean() <= 0.6, f"{kind} should be common enough to matter"
    assert abs(by_class[1] - by_class[0]) < 0.04, f"{kind}: {by_class.to_dict()}"


def test_plan_is_deterministic_and_seed_dependent():
    first = plan_dataset(TINY)[0]
    pd.testing.assert_frame_equal(first, plan_dataset(TINY)[0])
    other = plan_dataset(TINY.model_copy(update={"seed": 4}))[0]
    assert not first.equals(other)


def test_small_melanoma_rate_still_gives_both_classes():
    table = plan_dataset(SyntheticConfig(n_patients=2, images_per_patient=(1, 1), melanoma_rate=0.01))[0]
    assert sorted(table[schema.TARGET]) == [0, 1]


@pytest.mark.parametrize("bad_range", [(0, 2), (4, 3)])
def test_bad_images_per_patient_is_refused(tmp_path: Path, bad_range):
    config = SyntheticConfig(images_per_patient=bad_range)
    with pytest.raises(ValueError, match="images_per_patient"):
        generate_synthetic_dataset(tmp_path / "syn", config)


# --- files on disk --------------------------------------------------------------------------------------


def test_layout_files_and_masks(tmp_path: Path):
    ds = generate_synthetic_dataset(tmp_path / "syn", TINY)
    table = pd.read_csv(ds.csv_path)
    assert list(table.columns) == ISIC_2020_COLUMNS
    assert ds.csv_path == tmp_path / "syn" / "train.csv"
    assert ds.image_dir == tmp_path / "syn" / "jpeg" / "train" and ds.mask_dir == tmp_path / "syn" / "masks"
    assert ds.n_images == len(table) and ds.n_patients == table[schema.PATIENT].nunique()
    assert ds.n_melanoma == table[schema.TARGET].sum() > 0
    assert table[schema.IMAGE].str.fullmatch(r"SYN_\d{7}").all()
    assert table[schema.PATIENT].str.fullmatch(r"SYNP_\d{4}").all()
    assert sorted(p.stem for p in ds.image_dir.iterdir()) == sorted(table[schema.IMAGE])
    for name in table[schema.IMAGE]:
        assert load_rgb(ds.image_dir / f"{name}.jpg").shape == (48, 48, 3)
        mask = np.asarray(load_rgb(ds.mask_dir / f"{name}.png"))[..., 0]
        assert set(np.unique(mask)) <= {0, 255} and 0 < (mask == 255).mean() < 0.9
    artifacts = pd.read_csv(ds.artifacts_path)
    assert list(artifacts.columns) == [schema.IMAGE, *ARTIFACT_KINDS]
    manifest = json.loads((ds.root / "manifest.json").read_text())
    assert manifest["config"] == TINY.model_dump(mode="json") and manifest["n_images"] == ds.n_images
    assert not [p for p in tmp_path.iterdir() if p.name != "syn"], "no temp folders are left behind"


def test_same_config_gives_identical_files(tmp_path: Path):
    a = generate_synthetic_dataset(tmp_path / "a", TINY)
    b = generate_synthetic_dataset(tmp_path / "b", TINY)
    assert a.csv_path.read_bytes() == b.csv_path.read_bytes()
    for image in a.image_dir.iterdir():
        assert image.read_bytes() == (b.image_dir / image.name).read_bytes(), image.name


def test_complete_dataset_is_reused(tmp_path: Path, monkeypatch):
    first = generate_synthetic_dataset(tmp_path / "syn", TINY)

    def no_rendering(*args, **kwargs):
        raise AssertionError("a complete dataset with the same config must not be regenerated")

    monkeypatch.setattr(synthetic, "render_view", no_rendering)
    assert generate_synthetic_dataset(tmp_path / "syn", TINY) == first


@pytest.mark.parametrize("damage", ["no manifest", "missing image", "other config", "corrupt manifest"])
def test_incomplete_or_stale_dataset_is_rebuilt(tmp_path: Path, damage):
    root = tmp_path / "syn"
    ds = generate_synthetic_dataset(root, TINY)
    config = TINY
    first_image = next(iter(sorted(ds.image_dir.iterdir())))
    if damage == "no manifest":
        (root / "manifest.json").unlink()
        first_image.unlink()
    elif damage == "missing image":
        first_image.unlink()
    elif damage == "corrupt manifest":
        (root / "manifest.json").write_text("{not json")
    else:
        config = TINY.model_copy(update={"n_patients": 5})
    rebuilt = generate_synthetic_dataset(root, config)
    table = pd.read_csv(rebuilt.csv_path)
    assert rebuilt.n_patients == config.n_patients
    assert sorted(p.stem for p in rebuilt.image_dir.iterdir()) == sorted(table[schema.IMAGE])
    assert json.loads((root / "manifest.json").read_text())["config"] == config.model_dump(mode="json")


def test_folder_with_foreign_files_is_not_replaced(tmp_path: Path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match=r"thesis\.docx.*choose an empty or new folder"):
        generate_synthetic_dataset(root, TINY)
    assert (root / "thesis.docx").read_text() == "precious"


# --- the lesions carry the label ------------------------------------------------------------------------


def test_melanoma_is_learnable_from_pixels_but_not_trivially(tmp_path: Path):
    """A linear model on 8x8 thumbnails separates the classes; lesion size alone does not do it perfectly."""
    config = SyntheticConfig(n_patients=60, image_size=64, seed=5)
    ds = generate_synthetic_dataset(tmp_path / "syn", config)
    table = pd.read_csv(ds.csv_path)
    thumbs, areas = [], []
    for name in table[schema.IMAGE]:
        thumbs.append(load_rgb(ds.image_dir / f"{name}.jpg", max_side=8).reshape(-1) / 255.0)
        areas.append((load_rgb(ds.mask_dir / f"{name}.png")[..., 0] > 0).mean())
    y = table[schema.TARGET].to_numpy()
    scores = cross_val_predict(
        LogisticRegression(C=1.0, max_iter=2000),
        np.stack(thumbs),
        y,
        groups=table[schema.PATIENT],
        cv=GroupKFold(n_splits=4),
        method="predict_proba",
    )[:, 1]
    pixel_auc = roc_auc_score(y, scores)
    area_auc = roc_auc_score(y, areas)
    assert pixel_auc > 0.75, pixel_auc
    assert 0.6 < area_auc < 0.97, area_auc


# --- the acquisition domain (a "second clinic") ---------------------------------------------------------

# sha256 of every raw RGB + mask array of TINY, rendered by the generator before the domain knob existed
# (checked byte-for-byte against that version). If a Pillow/numpy upgrade or a rendering change moves it,
# the demo data changed: bump synthetic.GENERATOR_VERSION so cached folders are rebuilt, then update this.
TINY_DEFAULT_LOOK_SHA256 = "35b008b4cd22968aabb0c0977f50f66bd8a8a20316b75985216d1392c5707832"


def _render(config: SyntheticConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Raw (pre-JPEG) images and masks of ``config``."""
    table, _, lesions, views = plan_dataset(config)
    tones = synthetic._patient_skin_tones(table[schema.PATIENT], config.seed)
    pairs = [
        synthetic.render_view(lesion, view, tone, config.image_size, config.domain)
        for lesion, view, tone in zip(lesions, views, tones, strict=True)
    ]
    return [rgb for rgb, _ in pairs], [mask for _, mask in pairs]


def _with_domain(config: SyntheticConfig, **changes) -> SyntheticConfig:
    return config.model_copy(update={"domain": SyntheticDomain(**changes)})


def _sharpness(images: list[np.ndarray]) -> float:
    """Mean absolute difference between horizontally adjacent pixels (falls with blur)."""
    return float(np.mean([np.abs(np.diff(img.astype(np.float32), axis=1)).mean() for img in images]))


def test_default_domain_renders_todays_look_pixel_for_pixel():
    images, masks = _render(TINY)
    digest = hashlib.sha256()
    for rgb, mask in zip(images, masks, strict=True):
        digest.update(rgb.tobytes())
        digest.update(mask.tobytes())
    assert digest.hexdigest() == TINY_DEFAULT_LOOK_SHA256
    assert TINY.domain == SYNTHETIC_DOMAINS["default"] == SyntheticDomain()


@pytest.mark.parametrize(
    ("changes", "channel"),
    [
        ({"colour_cast": (1.0, 1.0, 0.8)}, 2),
        ({"colour_cast": (1.0, 0.8, 1.0)}, 1),
        ({"colour_cast": (0.8, 1, 1)}, 0),
    ],
)
def test_colour_cast_scales_its_channel(changes, channel):
    base = np.stack(_render(TINY)[0]).astype(np.float64).mean(axis=(0, 1, 2))
    cast = np.stack(_render(_with_domain(TINY, **changes))[0]).astype(np.float64).mean(axis=(0, 1, 2))
    ratio = cast / base
    assert ratio[channel] == pytest.approx(0.8, abs=0.01)
    assert np.delete(ratio, channel) == pytest.approx([1.0, 1.0], abs=0.005)


def test_blur_lowers_and_noise_raises_sharpness():
    base = _sharpness(_render(TINY)[0])
    assert _sharpness(_render(_with_domain(TINY, blur_sigma=0.02))[0]) < 0.8 * base
    assert _sharpness(_render(_with_domain(TINY, noise_std=8.0))[0]) > 1.2 * base


def test_scale_magnifies_the_lesion_and_its_mask():
    base = np.mean([(m > 0).mean() for m in _render(TINY)[1]])
    larger = np.mean([(m > 0).mean() for m in _render(_with_domain(TINY, scale=1.3))[1]])
    assert larger > 1.3 * base  # area grows roughly with scale squared, less where the image edge clips


def test_distractor_rates_move_only_their_own_flags():
    config = SyntheticConfig(n_patients=300, images_per_patient=(2, 6), seed=2)
    table, artifacts, lesions, _ = plan_dataset(config)
    shifted = _with_domain(config, vignette_rate=0.9, hair_rate=0.05)
    table2, artifacts2, lesions2, _ = plan_dataset(shifted)
    pd.testing.assert_frame_equal(table, table2)  # patients, metadata and labels: the same draw
    assert lesions == lesions2
    pd.testing.assert_frame_equal(artifacts[["ruler", "bubbles"]], artifacts2[["ruler", "bubbles"]])
    assert artifacts2["vignette"].mean() == pytest.approx(0.9, abs=0.03)
    assert artifacts2["hair"].mean() == pytest.approx(0.05, abs=0.02)
    assert (artifacts2["vignette"] >= artifacts["vignette"]).all(), "a higher rate only adds vignettes"
    assert (artifacts2["hair"] <= artifacts["hair"]).all(), "a lower rate only removes hair"


def test_second_clinic_keeps_labels_and_shifts_the_look(tmp_path: Path):
    second = TINY.model_copy(update={"domain": synthetic_domain("second_clinic")})
    default_ds = generate_synthetic_dataset(tmp_path / "default", TINY)
    second_ds = generate_synthetic_dataset(tmp_path / "second", second)
    assert default_ds.csv_path.read_bytes() == second_ds.csv_path.read_bytes()
    assert json.loads((second_ds.root / "manifest.json").read_text())["config"]["domain"]["scale"] == 1.2
    table = pd.read_csv(default_ds.csv_path)

    def blue_over_red(ds) -> float:
        pixels = np.stack([load_rgb(ds.image_dir / f"{n}.jpg") for n in table[schema.IMAGE]]).astype(float)
        return float(pixels[..., 2].mean() / pixels[..., 0].mean())

    assert blue_over_red(second_ds) < 0.85 * blue_over_red(default_ds), "the second clinic is warmer"


def test_unknown_domain_preset_and_bad_gain_are_refused():
    with pytest.raises(ValueError, match=r"unknown synthetic domain 'clinic_b'.*second_clinic"):
        synthetic_domain("clinic_b")
    with pytest.raises(ValidationError, match="colour_cast"):
        SyntheticDomain(colour_cast=(1.0, 0.0, 1.0))


def test_folder_written_before_the_domain_knob_is_reused(tmp_path: Path, monkeypatch):
    ds = generate_synthetic_dataset(tmp_path / "syn", TINY)
    manifest_path = ds.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["domain"]
    manifest_path.write_text(json.dumps(manifest))

    def no_rendering(*args, **kwargs):
        raise AssertionError("a pre-domain folder has the default look and must be reused")

    monkeypatch.setattr(synthetic, "render_view", no_rendering)
    assert generate_synthetic_dataset(tmp_path / "syn", TINY) == ds
    with pytest.raises(AssertionError, match="must be reused"):
        generate_synthetic_dataset(tmp_path / "syn", _with_domain(TINY, noise_std=1.0))
