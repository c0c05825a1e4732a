"""Training one fold: dataset and loaders (``data``), losses (``losses``), the LightningModule
(``module``), safetensors checkpoints (``checkpoint``) and ``train.train_fold``.

Submodules are imported explicitly (``from melanoma_ml.training.train import train_fold``) so that
importing this package does not load torch or lightning.
"""
