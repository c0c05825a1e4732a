"""Process-wide settings that keep the libraries we use quiet and offline-friendly."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


def quiet_network_chatter() -> None:
    """Turn off telemetry and update checks unless the user set these variables already.

    Must run before albumentations, gradio or dagster are imported. ``HF_HUB_OFFLINE`` is left to the
    user: with ``pretrained=True`` on a connected machine we do want the hub.
    """
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
