"""Decode any image a user may hand us into one predictable array: (H, W, 3) uint8 RGB.

Every path that reads pixels (metadata cleaning, the image cache, the Gradio app) goes through
``load_rgb`` so that EXIF orientation, odd colour modes and hostile files are handled once.

Decisions:
    * Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white, which is
      what an image viewer shows the user. Dropping alpha instead would expose whatever colour the
      exporter left under transparent pixels (often black): pixels nobody has seen.
    * 16-bit greyscale is scaled by its full range (value / 257, so 65535 -> 255) rather than clipped,
      which would turn nearly every pixel white. 32-bit integer data outside 0..65535 and float images
      have no fixed range and are scaled from their own min..max.
    * An ``hdf5://<file>#<key>`` source (``images.hdf5``) is read as the bytes stored under ``key`` and
      decoded like an upload, so HDF5-stored images (ISIC 2024) take the same path as files.
    * Size limits are checked from the header before any pixel is decoded. ``max_side`` asks the JPEG
      decoder for a reduced-scale decode (``Image.draft``), so a large JPEG is never held at full size.

Known limit: libjpeg repairs some damage inside the compressed stream (it warns and fills in grey), so a
JPEG with garbage in the middle can decode "successfully". Truncated files and broken headers are caught.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoma_ml.errors import InputValueError
from melanoma_ml.images import hdf5

ImageSource = str | Path | bytes

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image (width x height) we decode; ISIC originals are at most ~24 Mpx."""

_PROBE_SIDE = 256
"""``probe_image`` decodes JPEGs at reduced scale: the whole stream is still read (so truncation is
caught), but the inverse DCT runs on fewer pixels."""

_WHITE = (255, 255, 255)
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112
_FIX_FILE = "re-export the image or remove its row from the metadata"
_FIX_LARGE = "downscale the image (or raise max_pixels if the file is trusted)"

UPLOAD_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WebP")
"""Photo formats ``load_rgb`` decodes (tested), as named to users: the app's upload label and hints."""
UPLOAD_FORMATS_TEXT = f"{', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]}"
_FIX_UPLOAD = f"upload a {UPLOAD_FORMATS_TEXT} image"


class ImageDecodeError(InputValueError):
    """An image could not be read. The message reads ``"<problem>: <source>; <fix>"``.

    Attributes:
        source: the file path (callers may append the row), or ``"uploaded bytes"``.
        problem: what is wrong, e.g. ``"file is truncated or corrupt (...)"``.
        fix: what the user should do about it.
    """

    def __init__(self, source: str, problem: str, fix: str) -> None:
        super().__init__(f"{problem}: {source}; {fix}")
        self.source = source
        self.problem = problem
        self.fix = fix

    @property
    def reason(self) -> str:
        """The message without the source, for tables that already name the file (quarantine)."""
        return f"{self.problem}; {self.fix}"

    def with_source(self, source: str) -> ImageDecodeError:
        """The same error naming a different source, e.g. the path plus its row number."""
        return ImageDecodeError(source, self.problem, self.fix)

    def __reduce__(self):  # keep the error picklable across worker processes
        return (ImageDecodeError, (self.source, self.problem, self.fix))


def describe_source(source: ImageSource) -> str:
    """How an image source is named in messages."""
    return "uploaded bytes" if isinstance(source, bytes | bytearray) else str(source)


def load_rgb(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> np.ndarray:
    """Decode an image file or in-memory bytes to an (H, W, 3) uint8 RGB array.

    Args:
        source: a file path or the raw bytes of an encoded image (e.g. an upload).
        max_pixels: refuse images whose header declares more than this many pixels (decompression bombs).
        max_side: if given, downscale (keeping aspect) so that neither side exceeds it. JPEGs are then
            decoded at reduced scale, which keeps memory proportional to the output.

    Returns:
        A C-contiguous (H, W, 3) uint8 array with EXIF orientation applied.

    Raises:
        ImageDecodeError: the file is missing, empty, not an image, too large, truncated or corrupt.
        ValueError: ``max_side`` is not positive.
    """
    if max_side is not None and max_side < 1:
        raise InputValueError(f"max_side must be a positive number of pixels or None, got {max_side}")
    name = describe_source(source)
    with _open(source) as img:
        _check_pixel_budget(img, name, max_pixels)
        if max_side is not None:
            # Reduced-scale JPEG decode (no-op for other formats); each side stays >= max_side.
            img.draft("RGB", (max_side, max_side))
        _decode(img, name)
        try:
            oriented = ImageOps.exif_transpose(img)
        except (OSError, ValueError, SyntaxError) as err:  # malformed EXIF block
            raise ImageDecodeError(name, f"unreadable EXIF block ({err})", _FIX_FILE) from err
        rgb = to_rgb(oriented)
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) as ``load_rgb`` would return it, read from the header only (no pixel decode).

    EXIF orientations that rotate by 90 degrees swap the stored width and height.

    Raises:
        ImageDecodeError: the file is missing, empty or not an image.
    """
    with _open(source) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
        except (OSError, ValueError, SyntaxError):
            orientation = None  # load_rgb reports the malformed EXIF when the pixels are read
    if orientation in _ROTATING_ORIENTATIONS:
        return height, width
    return width, height


def probe_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes fine.

    Used by metadata cleaning to quarantine rows. All the data are decoded (so truncation is found),
    JPEGs at reduced scale to keep it fast.
    """
    try:
        load_rgb(path, max_pixels=max_pixels, max_side=_PROBE_SIDE)
    except ImageDecodeError as err:
        return err.reason
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in {"I", "F"}:
        return Image.fromarray(_scale_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    # L, 1, P, CMYK (Adobe's inverted CMYK is undone by the JPEG plugin), YCbCr, LAB, HSV.
    return img.convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a single-channel 16/32-bit or float array onto 0..255 without clipping."""
    if values.dtype.kind in "iu" and _fits_16_bit(values):
        # 16-bit data (I;16, or a 16-bit PNG opened as mode I): full-range scaling, 65535 -> 255.
        return np.round(values.astype(np.float32) / 257.0).astype(np.uint8)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values.astype(np.float64), nan=low) - low) * (255.0 / (high - low))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def _fits_16_bit(values: np.ndarray) -> bool:
    return values.size > 0 and int(values.min()) >= 0 and int(values.max()) <= 65535


def _open(source: ImageSource) -> Image.Image:
    """``Image.open`` (header only) with every failure turned into an ``ImageDecodeError``."""
    name = describe_source(source)
    empty_fix = _FIX_UPLOAD
    if hdf5.is_ref(source):  # an image stored inside an HDF5 file (ISIC 2024): decoded from its bytes
        try:
            source = hdf5.read_bytes(source)
        except hdf5.HDF5ImageError as err:
            raise ImageDecodeError(name, err.problem, err.fix) from err
        empty_fix = _FIX_FILE
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageDecodeError(name, "empty image (0 bytes)", empty_fix)
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
        fix = empty_fix
    else:
        stream = Path(source)
        fix = "convert it to JPEG or PNG or remove its row from the metadata"
        if not stream.exists():
            raise ImageDecodeError(
                name,
                "image file missing",
                "set data.image_dir (or fix the image_path column) or remove the row",
            )
        if stream.is_dir():
            raise ImageDecodeError(name, "a folder, not an image file", "point the row at an image file")
        if not stream.is_file():  # a FIFO or device has st_size 0 but is not empty: never read it
            raise ImageDecodeError(
                name, "not a regular file (a FIFO, device or socket)", "point the row at an image file"
            )
        if stream.stat().st_size == 0:
            raise ImageDecodeError(name, "image file is empty (0 bytes)", _FIX_FILE)
    try:
        with warnings.catch_warnings():
            # We enforce our own max_pixels; PIL's warning for mid-sized images is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except Image.DecompressionBombError as err:
        raise _pillow_bomb_error(name) from err
    except UnidentifiedImageError as err:
        claimed = _format_from_magic(source if isinstance(source, bytes | bytearray) else stream)
        if claimed:  # PIL reports a damaged JPEG/PNG header as "unidentified": say what it really is
            raise ImageDecodeError(
                name,
                f"file is truncated or corrupt (starts like a {claimed} but its header is unreadable)",
                _FIX_FILE,
            ) from err
        raise ImageDecodeError(name, "not a recognised image format", fix) from err
    except PermissionError as err:
        raise ImageDecodeError(
            name, "image file not readable (permission denied)", "fix its permissions"
        ) from err
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some malformed headers
        raise ImageDecodeError(
            name, f"file is truncated or corrupt (unreadable header: {err})", _FIX_FILE
        ) from err


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _format_from_magic(source: bytes | bytearray | Path) -> str | None:
    """The format a file's first bytes announce, or None."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            head = fh.read(8)
    else:
        head = bytes(source[:8])
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def _pillow_bomb_error(name: str) -> ImageDecodeError:
    """Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``) fired before ours could."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return ImageDecodeError(
        name,
        f"image is above Pillow's hard limit of {limit:,} pixels (decompression-bomb guard)",
        "downscale the image",
    )


def _check_pixel_budget(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError(name, f"image header declares an empty size {width}x{height}", _FIX_FILE)
    if width * height > max_pixels:
        raise ImageDecodeError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            "(decompression-bomb guard)",
            _FIX_LARGE,
        )


def _decode(img: Image.Image, name: str) -> None:
    """Decode all pixel data now so truncated or corrupt files fail here, with a clear message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as err:
        raise _pillow_bomb_error(name) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(name, f"file is truncated or corrupt ({err})", _FIX_FILE) from err
