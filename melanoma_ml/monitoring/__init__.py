"""After promotion: what serving saw (the prediction log), how it drifts, and the outcomes that come back.

Pure library (no dagster). It may import ``serving`` and ``evaluation``; only the CLI, the app and the
Dagster layer import it.
"""
