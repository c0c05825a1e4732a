"""Step values travel between workers whose working roots differ: paths under the root are relative."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from melanoma_assets.object_store import dumps_relocatable, loads_relocatable, store_resources
from melanoma_assets.resources import default_settings
from melanoma_ml.errors import InputValueError


def test_paths_under_the_writers_root_open_under_the_readers_root(tmp_path: Path) -> None:
    writer, reader = tmp_path / "worker-a", tmp_path / "worker-b-longer-name"
    table = pd.DataFrame({"image_path": [str(writer / "data/x.jpg"), "/elsewhere/y.jpg"], "n": [1, 2]})
    value = {
        "checkpoint": writer / "checkpoints/net/fold0",
        "cache": str(writer / "cache/32px"),
        "outside": Path("/data/isic"),
        "table": table,
        "root_itself": str(writer),  # not under the root: kept as written
    }
    back = loads_relocatable(dumps_relocatable(value, writer), reader)
    assert back["checkpoint"] == reader / "checkpoints/net/fold0" and isinstance(back["checkpoint"], Path)
    assert back["cache"] == str(reader / "cache/32px")
    assert back["outside"] == Path("/data/isic") and back["root_itself"] == str(writer)
    assert back["table"]["image_path"].tolist() == [str(reader / "data/x.jpg"), "/elsewhere/y.jpg"]
    assert back["table"].dtypes.equals(table.dtypes)  # text columns keep their dtype
    assert value["table"]["image_path"][0].startswith(str(writer))  # the value itself is untouched


def test_the_store_setting_adds_an_io_manager_and_rejects_other_urls() -> None:
    settings = default_settings("tiny")
    assert store_resources(settings, None) == {}
    assert set(store_resources(settings, "s3://bucket/prefix")) == {"io_manager"}
    with pytest.raises(InputValueError, match="not an s3://bucket/prefix URL.*MELANOMA_ARTIFACT_STORE"):
        store_resources(settings, "gs://bucket/prefix")


def test_celery_needs_a_broker_and_sends_training_to_its_queue(monkeypatch) -> None:
    from melanoma_assets.definitions import build_definitions
    from melanoma_assets.executors import BROKER_ENV, CELERY_QUEUE_TAG, VISIBILITY_ENV, celery_config_from_env

    monkeypatch.delenv(BROKER_ENV, raising=False)
    with pytest.raises(InputValueError, match="MELANOMA_EXECUTOR=celery needs MELANOMA_CELERY_BROKER"):
        build_definitions("tiny", executor="celery")
    monkeypatch.setenv(BROKER_ENV, "redis://127.0.0.1:6379/0")
    monkeypatch.setenv(VISIBILITY_ENV, "soon")
    with pytest.raises(InputValueError, match="not a positive whole number of seconds"):
        celery_config_from_env()
    monkeypatch.setenv(VISIBILITY_ENV, "600")
    config = celery_config_from_env()
    assert config["backend"] == config["broker"] and config["config_source"]["task_acks_late"]
    assert config["config_source"]["broker_transport_options"]["visibility_timeout"] == 600
    defs = build_definitions("tiny", executor="celery")
    assert defs.resolve_assets_def("fold_model").op.tags[CELERY_QUEUE_TAG] == "training"
    assert CELERY_QUEUE_TAG not in defs.resolve_assets_def("leaderboard").op.tags  # the default queue
