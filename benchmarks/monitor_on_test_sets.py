"""The serving monitor on real days: a run's untouched test sets replayed as if each were one day of the log.

For finished ``benchmarks/real_isic_sample.py`` runs scored by ``benchmarks/pretrained_table.py --scores
served`` (which caches every test image's served probability and OOD flag in
``<workdir>/served_test_scores.parquet``), each test set is handed to
``melanoma_ml.monitoring.monitor.monitor_day`` with the run's promoted manifest, exactly as the
``serving_monitor`` asset hands it one UTC day of the prediction log. The locked test split is what an
in-distribution day looks like (same clinic, never trained on); an external set such as PH2 is what a day
at another clinic looks like. Printed per run and set: score PSI and KS p against the bundle's reference,
OOD-flag and positive-decision rates against their expected values, the CBPE estimates, the realised AUC
and sensitivity (the labels the monitor does not see), and the warnings the asset checks would raise at
the default ``monitoring`` thresholds.

Usage::

    .venv/bin/python benchmarks/monitor_on_test_sets.py /tmp/real/b0_128 /tmp/real/lite0_128
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine_load, open_run  # noqa: E402

SCORES_FILE = "served_test_scores.parquet"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "workdirs", nargs="+", type=Path, help="finished run folders scored by pretrained_table.py"
    )
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd

    from melanoma_ml.config import PipelineConfig
    from melanoma_ml.evaluation.metrics import roc_auc, threshold_metrics
    from melanoma_ml.monitoring.monitor import monitor_day

    print(
        "| run | set | images | score PSI | KS p | OOD flags (expected) | positive rate (expected) | CBPE AUC / sens | realised AUC / sens | warnings |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workdir in args.workdirs:
        scores_file = workdir / SCORES_FILE
        if not scores_file.is_file():
            raise SystemExit(
                f"{scores_file} not found: run benchmarks/pretrained_table.py --run X={workdir} first"
            )
        registry = open_run(workdir).registry()
        version = registry.current()
        if version is None:
            raise SystemExit(f"nothing is served from the registry of {workdir}: promote a model first")
        manifest = registry.verify(version)
        config = PipelineConfig(artifact_root=str(workdir))
        scores = pd.read_parquet(scores_file)
        for test_set, rows in scores.groupby("test_set", sort=False):
            prob = rows["prob"].astype(float).to_numpy()
            day = pd.DataFrame(
                {
                    "model_version": manifest.version,
                    "probability": prob,
                    "positive": prob >= manifest.threshold,
                    "ood_flag": rows["ood_flag"].to_numpy(),
                    "age": rows.get("age_approx", pd.Series(np.nan, index=rows.index)).to_numpy(),
                    "sex": None,
                    "anatom_site": None,
                }
            )
            report = monitor_day(day, manifest, config)
            m = report.metrics()
            y = rows["target"].astype(int).to_numpy()
            realised = threshold_metrics(y, prob, manifest.threshold)
            warnings = sorted({w.check for w in report.warnings}) or ["none"]
            print(
                f"| {workdir.name} | {test_set} | {len(rows)} | {m['score_psi']:.3f} | {m['score_ks_p']:.3g} | "
                f"{m['ood_flag_rate']:.1%} ({m['ood_expected_rate']:.1%}) | {m['positive_rate']:.2f} "
                f"({m['expected_positive_rate']:.2f}) | {m['estimated_auc']:.3f} / {m['estimated_sensitivity']:.2f} | "
                f"{roc_auc(y, prob):.3f} / {realised['sensitivity']:.2f} | {', '.join(warnings)} |"
            )


if __name__ == "__main__":
    with machine_load():
        main()
