"""Image decoding (``io``) and the pre-resized image cache (``cache``).

Submodules are imported explicitly (``from melanoma_ml.images.io import load_rgb``) so that importing
this package stays cheap.
"""
