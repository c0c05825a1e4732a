"""Backbones ranked by their out-of-fold predictions: assembled per backbone, read back, ranked, saved.

``compare.leaderboard`` holds the statistics; this module holds each backbone's pooled out-of-fold table
(``backbone_oof``, saved as ``reports/<backbone>/oof.parquet``, read back by ``report_oof``) and the
``Leaderboard`` the pipeline passes to the promotion gate (``reports/leaderboard/``). With the tabular
baseline on, the board also shows the GBDT (``kind`` tabular-only) and the rank blend of the candidate with
it (``kind`` blend) as rows beside the image models; neither can be the candidate: the gate serves image
bundles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from melanoma_ml.artifacts import artifact_paths
from melanoma_ml.atomic import atomic_write_bytes, atomic_write_json, parquet_bytes
from melanoma_ml.config import EvaluationConfig, PipelineConfig
from melanoma_ml.errors import InputFileNotFoundError
from melanoma_ml.evaluation.compare import leaderboard, leaderboard_row, paired_auc_difference
from melanoma_ml.evaluation.external import (
    SELECTION_BIAS_NOTE,
    SELECTION_RULES,
    ExternalScore,
    external_scores,
    external_sets,
    select_candidate,
)

if TYPE_CHECKING:
    from melanoma_ml.evaluation.holdout import TestEvaluation
    from melanoma_ml.evaluation.report import EvaluationReport
    from melanoma_ml.training.train import FoldResult


@dataclass(frozen=True)
class Leaderboard:
    """Backbones ranked by out-of-fold AUC, with paired AUC differences against the candidate.

    The rows stay in out-of-fold AUC order (``rank``); the candidate is the image row that
    ``evaluation.select_on`` picks (``selection_score``: by default the highest out-of-fold AUC, i.e. the
    first row). With ``data.test_sources`` scored, every image row also carries, per external set ``S``,
    ``ext_S_auc`` [``ext_S_auc_lo``, ``ext_S_auc_hi``] (its fold-model mean on ``S``) and ``ext_S_gap``
    [``ext_S_gap_lo``, ``ext_S_gap_hi``] (external minus out-of-fold AUC, ``external.auc_gap``).

    Attributes:
        table: ``melanoma_ml.evaluation.leaderboard``: one row per backbone, best first, with AUC/pAUC CIs and
            the paired AUC difference to the candidate (``auc_diff_vs_best``, ``diff_lo``, ``diff_hi``),
            plus ``kind`` (:data:`IMAGE`); with the tabular baseline, its row and the blend's
            (``with_tabular_rows``), ranked among the image rows by AUC.
        candidate: The image backbone with the highest AUC: the one offered to the promotion gate.
        comparisons: Paired AUC differences that say what each part of the blend adds (blend vs the
            candidate: does the GBDT add anything; blend vs the GBDT: does the image model); empty without
            the tabular baseline.
        tabular_note: What the tabular baseline was, or why it is off ("" when not given).
        external: Every tested model (fold-model mean, served fold, top-k mean) on every external set: what
            the gate reads for the served model (``serving.champion.external_for``).
        selection: How the candidate was chosen: ``select_on``, ``rule``, ``scores`` (backbone -> its
            selection score), ``external_sets`` and, when those sets' numbers chose or gate the model,
            ``selection_bias`` (they are no longer untouched estimates).
    """

    table: pd.DataFrame
    candidate: str
    comparisons: tuple[dict[str, Any], ...] = ()
    tabular_note: str = ""
    external: tuple[ExternalScore, ...] = ()
    selection: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def rank(
        cls,
        reports: Mapping[str, EvaluationReport],
        oofs: Mapping[str, pd.DataFrame],
        config: EvaluationConfig,
        test_evaluation: TestEvaluation | None = None,
        tabular: TabularRows | None = None,
        tabular_note: str = "",
    ) -> Leaderboard:
        """Rank ``reports`` (their out-of-fold predictions ``oofs`` give the paired differences).

        With a scored ``test_evaluation``, each row leads with its backbone's test AUC [CI] (the fold-model
        mean on the locked test split, else the first external set: ``test_set``) and the optimism gap
        (out-of-fold minus test AUC), and carries its external columns (:func:`with_external_columns`).
        The order comes from the out-of-fold AUC; the candidate from ``config.select_on``
        (``external.select_candidate``; ``oof``: the out-of-fold AUC only), and every row's paired
        difference is to that candidate. With ``tabular`` (an enabled baseline), its row and the blend's
        are added (``with_tabular_rows``); ``tabular_note`` says what the baseline was or why it is off.

        Raises:
            InputValueError: ``select_on`` reads external sets and no external set was scored.
        """
        table = leaderboard(reports, oofs, config)
        table.insert(list(table.columns).index("backbone") + 1, KIND, IMAGE)
        scores = external_scores(test_evaluation)
        table = with_external_columns(table, scores)
        table, selection = with_selection(table, reports, oofs, scores, config)
        candidate = str(table.attrs["candidate"])
        comparisons: tuple[dict[str, Any], ...] = ()
        if tabular is not None:
            table, comparisons = with_tabular_rows(table, oofs[candidate], tabular, config)
        if test_evaluation is not None and test_evaluation.has_test:
            table = with_test_columns(table, test_evaluation)
        return cls(table, candidate, comparisons, tabular_note, scores, selection)

    def top_backbones(self, k: int) -> list[str]:
        """The ``k`` best image backbones, the candidate first (fewer if fewer exist): by out-of-fold AUC,
        or by ``selection_score`` when ``evaluation.select_on`` is not ``oof``."""
        image_rows = self.table[self.table[KIND] == IMAGE] if KIND in self.table.columns else self.table
        if self.selection.get("select_on", "oof") != "oof":
            image_rows = image_rows.sort_values(
                [SELECTION_SCORE, "auc", "backbone"], ascending=[False, False, True], kind="stable"
            )
        ranked = [self.candidate] + [b for b in image_rows["backbone"].astype(str) if b != self.candidate]
        return list(dict.fromkeys(ranked))[:k]

    def save(self, out_dir: Path) -> None:
        """Write ``leaderboard.parquet`` and ``leaderboard.json`` (candidate + rows) into ``out_dir``."""
        atomic_write_bytes(out_dir / "leaderboard.parquet", parquet_bytes(self.table))
        atomic_write_json(
            out_dir / "leaderboard.json",
            {
                "candidate": self.candidate,
                "rows": self.table.to_dict("records"),
                "comparisons": list(self.comparisons),
                "tabular_note": self.tabular_note,
                "selection": self.selection,
                "external": [score.to_dict() for score in self.external],
            },
        )


SELECTION_SCORE = "selection_score"
"""Leaderboard column: the number ``evaluation.select_on`` ranks image rows on (``external.selection_score``)."""


def external_column(test_set: str, what: str) -> str:
    """Name of a leaderboard column of external set ``test_set``: ``ext_<set>_auc``, ``..._gap_lo`` etc."""
    return f"ext_{test_set}_{what}"


EXTERNAL_FIELDS = ("auc", "auc_lo", "auc_hi", "gap", "gap_lo", "gap_hi")
"""Per external set, the leaderboard's columns (:func:`external_column`)."""


def with_external_columns(table: pd.DataFrame, scores: Sequence[ExternalScore]) -> pd.DataFrame:
    """``table`` with, per external set, each backbone's fold-model-mean AUC [CI] there and its gap to the
    out-of-fold AUC [MOVER CI] (NaN where a backbone has no result on that set)."""
    ensembles = {(s.backbone, s.test_set): s for s in scores if s.kind == "folds"}
    out = table.copy()
    for test_set in external_sets(scores):
        values: dict[str, list[float]] = {what: [] for what in EXTERNAL_FIELDS}
        for backbone in table["backbone"].astype(str):
            numbers = (float("nan"),) * len(EXTERNAL_FIELDS)
            if (score := ensembles.get((backbone, test_set))) is not None:
                auc, gap = score.auc, score.gap
                numbers = (auc.value, auc.lo, auc.hi, gap.value, gap.lo, gap.hi)
            for what, number in zip(EXTERNAL_FIELDS, numbers, strict=True):
                values[what].append(number)
        for what in EXTERNAL_FIELDS:
            out[external_column(test_set, what)] = values[what]
    out.attrs = dict(table.attrs)
    return out


def with_selection(
    table: pd.DataFrame,
    reports: Mapping[str, EvaluationReport],
    oofs: Mapping[str, pd.DataFrame],
    scores: Sequence[ExternalScore],
    config: EvaluationConfig,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``table`` with its ``selection_score`` column and the candidate ``config.select_on`` picks.

    Under ``oof`` the candidate stays the out-of-fold best (``compare.leaderboard``'s). Otherwise, when
    another backbone wins, the ``candidate`` column, ``attrs["candidate"]`` and every row's paired AUC
    difference (``auc_diff_vs_best``, ``diff_lo``, ``diff_hi``, ``p_value``) are redone against it.

    Returns:
        The table and the ``selection`` record (``Leaderboard.selection``).
    """
    select_on = config.select_on
    sets = external_sets(scores)
    backbones = [str(b) for b in table["backbone"]]
    oof_aucs = {b: reports[b].metric("auc") for b in backbones}
    external = {b: [s.auc for s in scores if s.kind == "folds" and s.backbone == b] for b in backbones}
    candidate, by_backbone = select_candidate(select_on, oof_aucs, external if select_on != "oof" else {})
    out = table.copy()
    out[SELECTION_SCORE] = [by_backbone[b] for b in backbones]
    if candidate != out.attrs["candidate"]:
        out["candidate"] = [b == candidate for b in backbones]
        for i, backbone in enumerate(backbones):
            if backbone == candidate:
                diff = {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": float("nan")}
            else:
                diff = paired_auc_difference(
                    oofs[backbone], oofs[candidate], config, names=(backbone, candidate)
                )
            out.loc[out.index[i], ["auc_diff_vs_best", "diff_lo", "diff_hi", "p_value"]] = [
                diff["diff"], diff["lo"], diff["hi"], diff["p_value"],
            ]  # fmt: skip
    out.attrs = {**table.attrs, "candidate": candidate}
    chose = select_on != "oof" or config.max_external_gap is not None
    selection: dict[str, Any] = {
        "select_on": select_on,
        "rule": SELECTION_RULES[select_on],
        "candidate": candidate,
        "scores": by_backbone,
        "external_sets": sets,
        "max_external_gap": config.max_external_gap,
    }
    if chose and sets:
        selection["selection_bias"] = {test_set: SELECTION_BIAS_NOTE for test_set in sets}
    return out, selection


KIND = "kind"
"""Leaderboard column saying what a row is: :data:`IMAGE`, :data:`TABULAR_ONLY` or :data:`BLEND`."""
IMAGE = "image"
TABULAR_ONLY = "tabular-only (not servable)"
BLEND = "blend (not servable)"


@dataclass(frozen=True)
class TabularRows:
    """What the leaderboard needs of the tabular baseline to show it and the blend.

    Attributes:
        report: The GBDT's out-of-fold report (``tabular.baseline.run_tabular_baseline``).
        oof: Its out-of-fold predictions, over the same images as the image models'.
        blend_dir: Where the blend's report and out-of-fold table are written; None writes nothing.
    """

    report: EvaluationReport
    oof: pd.DataFrame
    blend_dir: Path | None = None


def with_tabular_rows(
    table: pd.DataFrame, candidate_oof: pd.DataFrame, tabular: TabularRows, config: EvaluationConfig
) -> tuple[pd.DataFrame, tuple[dict[str, Any], ...]]:
    """``table`` with the GBDT's row and the blend's row, all rows re-ranked by out-of-fold AUC.

    The blend is ``evaluation.blend.rank_blend`` of the candidate's and the GBDT's out-of-fold predictions
    (equal weights, no fitted parameters), evaluated with ``evaluate_predictions`` on those same rows, so
    its AUC/pAUC carry the same patient-bootstrap CIs. Every row's ``auc_diff_vs_best`` is its paired AUC
    difference to the candidate (positive: better than the best image model); ``candidate`` stays on the
    best image model, and rows of the other kinds are never offered to the promotion gate.

    Returns:
        The table and the ``comparisons``: blend vs candidate, blend vs GBDT (``paired_auc_difference``
        fields plus ``a``, ``b`` and the ``question`` each answers).

    Raises:
        InputValueError: the tables do not cover the same images (models trained on different folds tables).
    """
    from melanoma_ml.evaluation.blend import rank_blend
    from melanoma_ml.evaluation.report import evaluate_predictions

    candidate = str(table.attrs["candidate"])
    gbdt = tabular.report.name
    blend_name = f"{candidate}+{gbdt}"
    blend_oof = rank_blend([candidate_oof, tabular.oof], name=blend_name)
    if tabular.blend_dir is not None:
        atomic_write_bytes(tabular.blend_dir / "oof.parquet", parquet_bytes(blend_oof))
    blend_report = evaluate_predictions(blend_oof, config, out_dir=tabular.blend_dir, name=blend_name)
    vs_image = paired_auc_difference(blend_oof, candidate_oof, config, names=(blend_name, candidate))
    vs_gbdt = paired_auc_difference(blend_oof, tabular.oof, config, names=(blend_name, gbdt))
    gbdt_vs_image = paired_auc_difference(tabular.oof, candidate_oof, config, names=(gbdt, candidate))
    records = [
        _row(gbdt, TABULAR_ONLY, tabular.report, gbdt_vs_image),
        _row(blend_name, BLEND, blend_report, vs_image),
    ]
    extra = pd.DataFrame.from_records(records).reindex(columns=table.columns)
    extra["candidate"] = False
    out = pd.concat([table, extra], ignore_index=True)
    out = out.sort_values(["auc", "pauc", "backbone"], ascending=[False, False, True], kind="stable")
    out = out.reset_index(drop=True)
    out["rank"] = range(1, len(out) + 1)
    out.attrs = dict(table.attrs)
    comparisons = (
        {"a": blend_name, "b": candidate, "question": f"does {gbdt} add to {candidate}?", **vs_image},
        {"a": blend_name, "b": gbdt, "question": f"does {candidate} add to {gbdt}?", **vs_gbdt},
    )
    return out, comparisons


def _row(name: str, kind: str, report: EvaluationReport, diff: dict[str, Any]) -> dict[str, Any]:
    return {**leaderboard_row(name, report, diff), KIND: kind}


TEST_COLUMNS = ("test_set", "test_auc", "test_auc_lo", "test_auc_hi", "optimism_gap")
"""Leaderboard columns from the test evaluation, placed right after ``backbone``."""


def with_test_columns(table: pd.DataFrame, test_evaluation: TestEvaluation) -> pd.DataFrame:
    """``table`` with :data:`TEST_COLUMNS` after ``backbone`` (NaN where a backbone has no test result)."""
    rows = []
    for backbone in table["backbone"]:
        result = test_evaluation.headline(str(backbone), "folds")
        row = result.row() if result is not None else {}
        rows.append({column: row.get(column, float("nan")) for column in TEST_COLUMNS})
    test = pd.DataFrame(rows, columns=list(TEST_COLUMNS), index=table.index)
    at = list(table.columns).index("backbone") + 1
    out = pd.concat([table.iloc[:, :at], test, table.iloc[:, at:]], axis=1)
    out.attrs = dict(table.attrs)
    return out


def backbone_oof(backbone: str, fold_results: Sequence[FoldResult], n_folds: int) -> pd.DataFrame:
    """The out-of-fold predictions of all folds of ``backbone`` (every fold must be there, once).

    Raises:
        ValueError: a fold is missing or duplicated, or a result belongs to another backbone.
    """
    folds = sorted(r.fold for r in fold_results)
    others = sorted({r.backbone for r in fold_results} - {backbone})
    if others:
        raise ValueError(f"results of {others} were passed to the evaluation of {backbone!r}")
    if folds != list(range(n_folds)):
        raise ValueError(
            f"{backbone}: out-of-fold evaluation needs exactly folds 0..{n_folds - 1} once each, got {folds}; "
            "train the missing fold partitions first"
        )
    return pd.concat([r.oof for r in sorted(fold_results, key=lambda r: r.fold)], ignore_index=True)


def report_oof(config: PipelineConfig, backbone: str) -> pd.DataFrame:
    """The out-of-fold predictions ``pipeline.evaluate_backbone`` saved for ``backbone``.

    Raises:
        FileNotFoundError: ``backbone`` has not been evaluated under this artifact root.
    """
    path = artifact_paths(config).oof(backbone)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} not found; evaluate backbone {backbone!r} first")
    return pd.read_parquet(path)
