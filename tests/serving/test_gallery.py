"""Which validation images the Grad-CAM gallery shows (the rendering is tested in tests/assets)."""

from __future__ import annotations

import pandas as pd

from melanoma_ml.serving.gallery import pick_gallery_rows


def test_gallery_rows_mix_melanoma_and_benign_reproducibly() -> None:
    val = pd.DataFrame({"image_name": [f"I{i}" for i in range(10)], "target": [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]})
    picked = pick_gallery_rows(val, 4, seed=0)
    assert picked["target"].tolist() == [1, 1, 0, 0]
    assert picked.equals(pick_gallery_rows(val, 4, seed=0))
    assert len(pick_gallery_rows(val[val["target"] == 0], 4, seed=0)) == 4
