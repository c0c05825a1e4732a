"""Serving core: bundles, batched TTA inference, CAM explanations, the model registry and its gate.

Importing this package is cheap (no torch, no gradio): import the submodule you need.

- ``bundle``: ``save_bundle`` / ``load_bundle`` / ``verify_bundle`` (safetensors + JSON manifest with sha256).
- ``manifest``: ``BundleManifest``, the typed ``manifest.json`` (``schema_version``) every reader uses.
- ``inference``: ``preprocess``, ``dihedral_views``, ``predict``, ``predict_tensor``.
- ``explain``: ``explain``, ``target_layer_names``, ``default_target_layer``.
- ``registry``: ``ModelRegistry`` (immutable ``versions/vNNNN`` folders, atomic ``current.json`` pointer).
- ``promotion``: ``decide_promotion`` (pure promotion gate).
- ``app``: the Gradio app (the only module that imports gradio).
"""
