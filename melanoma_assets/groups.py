"""Asset group names (one per domain; jobs select by group)."""

DATA = "data"
TRAINING = "training"
EVALUATION = "evaluation"
SERVING = "serving"
SCORING = "scoring"
"""Batch scoring of drop-folder batches: partitioned by batch, downstream of the served model, run by its
own sensor; not part of the retraining run (``melanoma_ml.pipeline.STEPS``)."""
MONITORING = "monitoring"
"""The serving monitor: partitioned by UTC day of the prediction log, downstream of the served model, run
by its schedule; not part of the retraining run."""
