"""melanoma_ml: the plain ML library behind the melanoma asset pipeline.

Importing this package is cheap: heavy dependencies (torch, timm, lightning) load only in the
submodules that need them. This package never imports dagster.
"""

from melanoma_ml.runtime import quiet_network_chatter

quiet_network_chatter()

__version__ = "0.1.0"
