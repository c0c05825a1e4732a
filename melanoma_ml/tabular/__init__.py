"""Tabular models beside the image networks: the gradient-boosted baseline (``gbdt``, run by ``baseline``).
The rank blend of their out-of-fold predictions with an image model's is ``evaluation.blend``."""
