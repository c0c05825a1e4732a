"""Asset group names (one per domain; jobs select by group)."""

DATA = "data"
TRAINING = "training"
EVALUATION = "evaluation"
SERVING = "serving"
