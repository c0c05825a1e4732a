"""Layout detection and loading for ISIC 2020 / 2019 / HAM10000 / isic-cli folders (small synthetic copies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_ml import schema
from melanoma_ml.metadata import (
    MetadataError,
    MetadataFileNotFound,
    detect_layout,
    find_image_dirs,
    load_dataset,
)


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


def write_csv(path: Path, lines: list[str], newline: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def isic2020(root: Path, gt_name: str = "ISIC_2020_Training_GroundTruth_v2.csv") -> Path:
    write_csv(
        root / gt_name,
        [
            "image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target",
            "ISIC_1,IP_1,IL_1,male,45,torso,unknown,benign,0",
            "ISIC_2,IP_1,IL_1,male,45,torso,unknown,benign,0",
            "ISIC_3,IP_2,IL_3,female,0,head/neck,melanoma,malignant,1",
        ],
    )
    return root


def isic2019(root: Path, with_gt: bool = True) -> Path:
    write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        [
            "image,age_approx,anatom_site_general,lesion_id,sex",
            "ISIC_0000001,55,anterior torso,,female",
            "ISIC_0000002_downsampled,30,lateral torso,BCN_1,male",
            "ISIC_0000003,,,BCN_1,",
            "ISIC_0000004,40,palms/soles,,male",
        ],
    )
    if with_gt:
        write_csv(
            root / "ISIC_2019_Training_GroundTruth.csv",
            [
                "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK",
                "ISIC_0000001,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                "ISIC_0000002_downsampled,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                "ISIC_0000003,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                "ISIC_0000004,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0",
            ],
        )
    return root


def ham10000(root: Path, name: str = "HAM10000_metadata.csv") -> Path:
    write_csv(
        root / name,
        [
            "lesion_id,image_id,dx,dx_type,age,sex,localization",
            "HAM_1,ISIC_0024306,nv,follow_up,45.0,male,back",
            "HAM_1,ISIC_0024307,nv,follow_up,45.0,male,back",
            "HAM_2,ISIC_0024308,mel,histo,0.0,unknown,acral",
            "HAM_3,ISIC_0024309,bkl,histo,,female,unknown",
        ],
        newline="\n",
    )
    return root


def isic_cli(root: Path) -> Path:
    write_csv(
        root / "metadata.csv",
        [
            "isic_id,attribution,copyright_license,age_approx,anatom_site_general,benign_malignant,"
            "diagnosis_1,diagnosis_2,diagnosis_3,diagnosis_4,diagnosis_5,lesion_id,patient_id,sex",
            "ISIC_9000001,A,CC-BY,60,posterior torso,malignant,Malignant,"
            "Malignant melanocytic proliferations (Melanoma),Melanoma in situ,"
            '"Melanoma in situ, Lentigo maligna type",,IL_1,IP_1,male',
            "ISIC_9000002,A,CC-BY,35,upper extremity,benign,Benign,Benign melanocytic proliferations,Nevus,,,IL_2,IP_1,male",
            "ISIC_9000003,A,CC-BY,70,head/neck,,Indeterminate,Indeterminate melanocytic proliferations,"
            "Atypical melanocytic neoplasm,,,IL_3,IP_2,female",
            "ISIC_9000004,A,CC-BY,50,lower extremity,malignant,Malignant,Malignant melanocytic proliferations (Melanoma),"
            "Melanoma metastasis,,,IL_4,IP_3,female",
        ],
        newline="\n",
    )
    return root


@pytest.mark.parametrize(
    ("build", "expected", "table"),
    [
        (isic2020, "isic2020", "ISIC_2020_Training_GroundTruth_v2.csv"),
        (
            lambda r: isic2020(r, "ISIC_2020_Training_GroundTruth.csv"),
            "isic2020",
            "ISIC_2020_Training_GroundTruth.csv",
        ),
        (isic2019, "isic2019", "ISIC_2019_Training_Metadata.csv"),
        (ham10000, "ham10000", "HAM10000_metadata.csv"),
        (isic_cli, "isic_cli", "metadata.csv"),
    ],
)
def test_detect_layout_by_files(tmp_path: Path, build, expected: str, table: str) -> None:
    match = detect_layout(build(tmp_path))
    assert match.name == expected
    assert match.files["table"].name == table
    assert match.reason


def test_detect_layout_generic_train_csv(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["image_name,patient_id,target", "ISIC_1,IP_1,0"], newline="\n")
    assert detect_layout(tmp_path).name == "isic2020"


def test_several_layouts_present_reason_names_them(tmp_path: Path) -> None:
    ham10000(isic2019(isic2020(tmp_path)))
    match = detect_layout(tmp_path)
    assert match.name == "isic2020"
    assert "isic2019" in match.reason and "ham10000" in match.reason


def test_nothing_matches_lists_files_and_requirements(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", ["a,b", "1,2"])
    (tmp_path / "pics").mkdir()
    with pytest.raises(MetadataError) as err:
        detect_layout(tmp_path)
    message = str(err.value)
    assert "labels.csv" in message and "pics/" in message
    for layout in ("isic2020", "isic2019", "ham10000", "isic_cli"):
        assert f"{layout} needs" in message
    with pytest.raises(MetadataFileNotFound):
        detect_layout(tmp_path / "nope")
    with pytest.raises(MetadataError, match="cannot tell the layout"):
        detect_layout(tmp_path / "labels.csv")
    with pytest.raises(MetadataError, match="not in the ham10000 layout"):
        load_dataset(tmp_path, layout="ham10000", check_images=False)


@pytest.mark.parametrize(
    ("dirs", "expected"),
    [
        (["jpeg/train", "train"], ["jpeg/train"]),
        (["train"], ["train"]),
        (["images"], ["images"]),
        (["ISIC_2019_Training_Input"], ["ISIC_2019_Training_Input"]),
        (
            ["HAM10000_images_part_1", "HAM10000_images_part_2"],
            ["HAM10000_images_part_1", "HAM10000_images_part_2"],
        ),
        ([""], [""]),
    ],
)
def test_find_image_dirs(tmp_path: Path, dirs: list[str], expected: list[str]) -> None:
    for i, d in enumerate(dirs):
        write_jpeg(tmp_path / d / f"ISIC_{i}.jpg", i)
    (tmp_path / "images_empty").mkdir()
    assert find_image_dirs(tmp_path) == [(tmp_path / d).resolve() for d in expected]


def test_isic2020_with_images_and_official_duplicates(tmp_path: Path) -> None:
    isic2020(tmp_path)
    write_csv(tmp_path / "ISIC_2020_Training_Duplicates.csv", ["image_name_1,image_name_2", "ISIC_1,ISIC_2"])
    for i in (1, 2, 3):
        write_jpeg(tmp_path / "jpeg" / "train" / f"ISIC_{i}.jpg", i)
    result = load_dataset(tmp_path)
    assert result.clean["image_name"].tolist() == ["ISIC_1", "ISIC_3"]
    q = result.quarantine
    assert q[["row", "image_name", "check"]].values.tolist() == [[1, "ISIC_2", "official_duplicate"]]
    assert q["reason"].iloc[0].startswith("official duplicate of ISIC_1")
    s = result.summary
    assert (s["rows_in"], s["rows_clean"], s["rows_quarantined"], s["layout"]) == (3, 2, 1, "isic2020")
    assert s["image_dirs"] == [str((tmp_path / "jpeg" / "train").resolve())]
    assert s["warnings"] == {"age_approx": 1}  # age 0 -> missing


def test_isic2019_onehot_downsampled_and_unlabeled(tmp_path: Path) -> None:
    isic2019(tmp_path)
    write_jpeg(tmp_path / "ISIC_2019_Training_Input" / "ISIC_0000001.jpg", 1)
    write_jpeg(tmp_path / "ISIC_2019_Training_Input" / "ISIC_0000002_downsampled.jpg", 2)
    write_jpeg(tmp_path / "ISIC_2019_Training_Input" / "ISIC_0000003.jpg", 3)
    result = load_dataset(tmp_path)
    clean = result.clean.set_index("image_name")
    assert list(clean.index) == ["ISIC_0000001", "ISIC_0000002"]  # suffix stripped from the id
    assert clean.loc["ISIC_0000002", "image_path"].endswith("ISIC_0000002_downsampled.jpg")
    assert clean["target"].tolist() == [0, 1]
    assert clean["diagnosis"].tolist() == ["nevus", "melanoma"]
    assert clean[schema.SITE].tolist() == ["torso", "torso"]
    checks = dict(zip(result.quarantine["image_name"], result.quarantine["check"], strict=True))
    assert checks == {"ISIC_0000003": "no_label", "ISIC_0000004": "image_missing"}


def test_isic2019_without_ground_truth_needs_a_decision(tmp_path: Path) -> None:
    isic2019(tmp_path, with_gt=False)
    with pytest.raises(MetadataError, match="require_labels=False"):
        load_dataset(tmp_path, check_images=False)
    result = load_dataset(tmp_path, check_images=False, require_labels=False)
    assert len(result.clean) == 4 and result.clean["target"].isna().all()


def test_ham10000_explicit_csv_name(tmp_path: Path) -> None:
    ham10000(tmp_path, name="metadata_raw_ham10000.csv")
    for i, name in enumerate(["ISIC_0024306", "ISIC_0024307", "ISIC_0024308", "ISIC_0024309"]):
        write_jpeg(tmp_path / "images" / f"{name}.jpg", i)
    result = load_dataset(tmp_path / "metadata_raw_ham10000.csv")
    clean = result.clean
    assert result.summary["layout"] == "ham10000" and result.summary["source"] == "HAM10000"
    assert clean["diagnosis"].tolist() == ["nevus", "nevus", "melanoma", "benign keratosis"]
    assert clean["target"].tolist() == [0, 0, 1, 0]
    assert clean[schema.SITE].tolist()[:3] == ["torso", "torso", "palms/soles"]
    assert clean[schema.PATIENT].isna().all() and clean[schema.LESION].tolist()[0] == "HAM_1"
    assert clean[schema.SEX].isna().tolist() == [False, False, True, False]
    # explicit layout on the same file gives the same table
    again = load_dataset(tmp_path / "metadata_raw_ham10000.csv", layout="ham10000", hash_images=False)
    assert again.clean["image_name"].tolist() == clean["image_name"].tolist()


def test_isic_cli_hierarchical_diagnosis(tmp_path: Path) -> None:
    isic_cli(tmp_path)
    for i, name in enumerate(["ISIC_9000001", "ISIC_9000002", "ISIC_9000003", "ISIC_9000004"]):
        write_jpeg(tmp_path / f"{name}.jpg", i)  # images beside metadata.csv
    result = load_dataset(tmp_path)
    clean = result.clean
    assert result.summary["layout"] == "isic_cli"
    assert clean["target"].tolist() == [1, 0, 0, 1]
    assert clean["diagnosis"].tolist() == [
        "Melanoma in situ, Lentigo maligna type",
        "Nevus",
        "Atypical melanocytic neoplasm",
        "Melanoma metastasis",
    ]
    assert clean[schema.SITE].tolist() == ["torso", "upper extremity", "head/neck", "lower extremity"]
    assert clean[schema.PATIENT].tolist() == ["IP_1", "IP_1", "IP_2", "IP_3"]


def test_isic_cli_legacy_diagnosis_column(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "metadata.csv",
        [
            "isic_id,diagnosis,benign_malignant,sex",
            "ISIC_1,melanoma,malignant,f",
            "ISIC_2,,benign,m",
            "ISIC_3,,,m",
        ],
    )
    result = load_dataset(tmp_path, check_images=False)
    assert result.clean["target"].tolist() == [1, 0]
    assert result.quarantine["check"].tolist() == ["no_label"]


def test_no_image_folder_is_a_clear_error(tmp_path: Path) -> None:
    isic2020(tmp_path)
    with pytest.raises(MetadataError, match="no image folder .*check_images=False"):
        load_dataset(tmp_path)


def test_missing_columns_name_the_layout(tmp_path: Path) -> None:
    write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id,image,dx", "HAM_1,ISIC_1,nv"])
    with pytest.raises(MetadataError, match=r"missing column\(s\) \['image_id'\].*HAM10000"):
        load_dataset(tmp_path, check_images=False)


def test_empty_csv_in_folder(tmp_path: Path) -> None:
    (tmp_path / "HAM10000_metadata.csv").write_bytes(b"")
    with pytest.raises(MetadataError, match="empty"):
        load_dataset(tmp_path, check_images=False)


UNUSABLE_TABLES = [
    ("metadata.csv", b"", ["empty (0 bytes)", "re-export"]),
    (
        "train.csv",
        "image_name,target,diagnóstico\nISIC_1,0,x\n".encode("latin-1"),
        ["not UTF-8", "UTF-8 CSV"],
    ),
    (
        "train.csv",
        b"image_name;patient_id;target\nISIC_1;IP_1;0\n",
        ["semicolon-separated", "comma-separated"],
    ),
    ("metadata.csv", b"image_name,patient_id\nISIC_1,IP_1\n", ["no label column", "target", "diagnosis"]),
    (
        "train.csv",
        b"image_name,patient_id,image_name,target\nISIC_1,IP_1,ISIC_2,0\n",
        ["repeated column name"],
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "words"), UNUSABLE_TABLES, ids=["empty", "latin1", "semicolon", "no_target", "dup"]
)
def test_unusable_table_gives_the_same_precise_reason_by_folder_and_by_file(
    tmp_path: Path, name: str, data: bytes, words: list[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(MetadataError) as by_file:
        load_dataset(path, check_images=False)
    with pytest.raises(MetadataError) as by_folder:
        load_dataset(tmp_path, check_images=False)
    for message in (str(by_file.value), str(by_folder.value)):
        assert str(path) in message, message
        for word in words:
            assert word in message, message


def test_folder_names_a_usable_table_it_does_not_pick_up(tmp_path: Path) -> None:
    write_csv(tmp_path / "my_isic_table.csv", ["image_name,target", "ISIC_1,0"])
    with pytest.raises(MetadataError, match=r"my_isic_table.csv has isic2020 columns.*data.source_dir"):
        detect_layout(tmp_path)


def test_folder_of_tif_images_is_found(tmp_path: Path) -> None:
    isic2020(tmp_path)
    for i in (1, 2, 3):
        path = tmp_path / "train" / f"ISIC_{i}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), i * 40, np.uint8)).save(path)
    result = load_dataset(tmp_path)
    assert result.summary["image_dirs"] == [str((tmp_path / "train").resolve())]
    assert result.clean["image_path"].str.endswith(".tif").all() and len(result.clean) == 3


def test_isic_cli_benign_malignant_level_must_agree_with_the_diagnosis(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "metadata.csv",
        [
            "isic_id,diagnosis_1,diagnosis_2,diagnosis_3",
            "ISIC_1,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma in situ",
            "ISIC_2,Benign,Malignant melanocytic proliferations (Melanoma),Melanoma in situ",
            "ISIC_3,Malignant,Malignant epidermal proliferations,Basal cell carcinoma",
            "ISIC_4,Malignant,Benign melanocytic proliferations,Nevus",
            "ISIC_5,Indeterminate,Indeterminate melanocytic proliferations,Atypical melanocytic neoplasm",
        ],
    )
    result = load_dataset(tmp_path, check_images=False)
    assert dict(zip(result.clean["image_name"], result.clean["target"], strict=True)) == {
        "ISIC_1": 1, "ISIC_3": 0, "ISIC_5": 0
    }  # fmt: skip
    q = result.quarantine.set_index("image_name")
    assert q["check"].to_dict() == {"ISIC_2": "label_conflict", "ISIC_4": "label_conflict"}
    assert "benign_malignant='Benign'" in q.loc["ISIC_2", "reason"]
    assert "'Nevus' is benign" in q.loc["ISIC_4", "reason"]
