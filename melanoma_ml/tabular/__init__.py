"""Tabular models beside the image networks: the gradient-boosted baseline (``gbdt``) and the rank blend
of out-of-fold predictions (``blend``)."""
