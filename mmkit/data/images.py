"""Load any image a user is likely to hand us as an 8-bit RGB ``PIL.Image``, or fail with a clear error.

``load_image`` accepts a path, raw file bytes, a ``PIL.Image`` or a numpy array, decodes it fully (a
truncated or corrupt file is an error, never a half-grey picture) and converts every mode to RGB:

=================  ==========================================================================
mode               conversion
=================  ==========================================================================
RGB                unchanged
1, L, P            Pillow's own conversion (palette looked up, grey replicated)
RGBA, LA, PA,      alpha-composited onto white; palette or grey/RGB images with a
P/L/RGB + tRNS     transparency key are expanded to RGBA first
RGBa, La           premultiplied alpha: composited onto white (``colour + 255 - alpha``)
CMYK, YCbCr,       Pillow's own conversion (no ICC colour management)
HSV, LAB, RGBX
I;16, I;16B/L/N    16-bit: scaled ``v * 255 / 65535`` and rounded (65535 -> 255, 257 -> 1), not clipped
I                  32-bit int: scaled as 16-bit when every value is in [0, 65535], else min-max
F                  float: [0, 1] -> x 255; else [0, 255] kept; else min-max; NaN/inf -> 0
=================  ==========================================================================

Numpy arrays follow the same rules by dtype: HxW, HxWx1 (grey), HxWx3 (RGB) or HxWx4 (RGBA) of uint8,
uint16, bool, float, or any integer type whose values lie in [0, 255].

EXIF orientation is applied to files and bytes (a phone photo comes out upright), not to ``PIL.Image``
or array inputs, which are taken as already oriented. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left
alone: if some other code turned it on, truncated files load as Pillow pads them.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ImageSource = str | Path | Image.Image | np.ndarray | bytes | bytearray

CONVERTED_MODES = (
    "RGB", "1", "L", "P", "PA", "LA", "La", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "LAB",
    "I;16", "I;16B", "I;16L", "I;16N", "I", "F",
)  # fmt: skip

_COMMON_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WebP", "PPM", "ICO", "TGA")


class ImageLoadError(ValueError):
    """An input that is not a fully decodable image. ``source`` names what was given."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source}: {reason}. {accepted_inputs()}")


def accepted_inputs() -> str:
    """One sentence listing what :func:`load_image` accepts (used in every error message)."""
    Image.init()
    return (
        f"Accepted: a path to (or the bytes of) a complete image file in a format Pillow reads "
        f"({', '.join(_COMMON_FORMATS)} and {max(len(Image.OPEN) - len(_COMMON_FORMATS), 0)} more), "
        f"a PIL.Image, or a numpy array HxW / HxWx1 / HxWx3 / HxWx4 of uint8, uint16, bool or float; "
        f"modes converted to RGB: {', '.join(CONVERTED_MODES)}."
    )


def load_image(src: ImageSource, *, apply_exif_orientation: bool = True) -> Image.Image:
    """Return ``src`` as a fully decoded 8-bit ``RGB`` ``PIL.Image`` (size W x H as in the source).

    src: a file path, the bytes of an image file, a ``PIL.Image`` (any mode), or a numpy array
    (H, W) / (H, W, 1) / (H, W, 3) / (H, W, 4). Raises :class:`ImageLoadError` (a ``ValueError``) for
    missing, unreadable, truncated or corrupt files and for arrays of an unsupported shape or dtype.
    """
    if isinstance(src, Image.Image):
        name = f"<PIL.Image mode={src.mode} size={src.size}>"
        # A lazily opened image is decoded here, so truncation surfaces as our error.
        _decode(src, name)
        return _to_rgb(src, name)
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _from_file(io.BytesIO(data), f"<{len(data)} bytes>", apply_exif_orientation)
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        name = repr(str(src))
        if not path.exists():
            raise ImageLoadError(
                name, "no such file; check the path (relative paths start at the working directory)"
            )
        if not path.is_file():
            raise ImageLoadError(name, "this is a directory, not an image file")
        return _from_file(path, name, apply_exif_orientation)
    raise ImageLoadError(
        f"<{type(src).__module__}.{type(src).__name__}>",
        "unsupported input type; pass a path (str or pathlib.Path), bytes, a PIL.Image or a numpy array",
    )


def _from_file(fp: Path | io.BytesIO, name: str, apply_exif_orientation: bool) -> Image.Image:
    try:
        img = Image.open(fp)
    except Image.UnidentifiedImageError:
        raise ImageLoadError(
            name, "not an image Pillow can identify (wrong extension, or not an image at all?)"
        ) from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({err})") from None
    except OSError as err:
        raise ImageLoadError(name, f"cannot be read ({err})") from err
    with img:  # closes the file; the image's pixel data is dropped too, so return a new object
        _decode(img, name)
        upright = _upright(img, name) if apply_exif_orientation else img
        rgb = _to_rgb(upright, name)
        return rgb.copy() if rgb is img else rgb


def _upright(img: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # malformed EXIF must not make a decodable image unreadable
        warnings.warn(f"{name}: EXIF orientation ignored ({type(err).__name__}: {err})", stacklevel=3)
        return img


def _decode(img: Image.Image, name: str) -> None:
    """Force a full decode: Pillow opens lazily and only notices truncation or corruption here."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise ImageLoadError(name, f"truncated or corrupt image data ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBa", "La"):
        return _premultiplied_on_white(np.asarray(img))
    if mode.startswith("I;16") or mode == "I":
        return _grey_to_rgb(_int_to_uint8(np.asarray(img)))
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(img)))
    if mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # tRNS: palette or colour-key alpha
        return _on_white(img.convert("RGBA"))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(name, f"mode {mode!r} cannot be converted to RGB ({err})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _premultiplied_on_white(arr: np.ndarray) -> Image.Image:
    # Premultiplied colour c_p = c * a / 255, so compositing on white is c_p + 255 - a.
    colour, alpha = arr[..., :-1].astype(np.int32), arr[..., -1:].astype(np.int32)
    out = np.clip(colour + 255 - alpha, 0, 255).astype(np.uint8)  # (H, W, 1 or 3)
    return _grey_to_rgb(out[..., 0]) if out.shape[-1] == 1 else Image.fromarray(out, "RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), "L").convert("RGB")


def _int_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit (or wider) integer samples -> uint8: v * 255 / 65535, rounded; out of range -> min-max."""
    wide = arr.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        return _min_max(wide.astype(np.float64))
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0):
        return np.round(values * 255.0).astype(np.uint8)
    if values.min() >= 0.0 and values.max() <= 255.0:
        return np.round(values).astype(np.uint8)
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _from_array(arr: np.ndarray) -> Image.Image:
    name = f"<numpy array shape={tuple(arr.shape)} dtype={arr.dtype}>"
    if arr.size == 0:
        raise ImageLoadError(name, "the array is empty")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise ImageLoadError(name, "this looks channels-first (C, H, W); pass arr.transpose(1, 2, 0)")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
        raise ImageLoadError(name, "expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.bool_:
        u8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        u8 = arr
    elif arr.dtype == np.uint16:
        u8 = _int_to_uint8(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        u8 = _float_to_uint8(arr)
    elif np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 255:
        u8 = arr.astype(np.uint8)
    else:
        raise ImageLoadError(
            name,
            "integer arrays other than uint8/uint16 must hold values in [0, 255]; "
            "convert with arr.astype(np.uint8) or arr.astype(np.uint16) first",
        )
    u8 = np.ascontiguousarray(u8)
    if u8.ndim == 3 and u8.shape[-1] == 1:
        u8 = u8[..., 0]
    if u8.ndim == 2:
        return _grey_to_rgb(u8)
    if u8.shape[-1] == 4:
        return _on_white(Image.fromarray(u8, "RGBA"))
    return Image.fromarray(u8, "RGB")




def image_grid(images, cols: int | None = None, scale: int | None = None, pad: int = 2):
    """PIL grid of ``images`` (list of PIL images, or a (N, 3, H, W) tensor in [0, 1]).

    cols: default ceil(sqrt(N)); scale: nearest-neighbour upscaling, default so tiles are >= 128 px.
    """
    from PIL import Image

    if hasattr(images, "detach"):
        from ..diffusion.pixel_pipeline import to_uint8

        images = [Image.fromarray(a) for a in to_uint8(images)]
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    scale = scale or max(1, math.ceil(128 / max(w, h)))
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    tw, th = w * scale, h * scale
    grid = Image.new("RGB", (cols * tw + (cols + 1) * pad, rows * th + (rows + 1) * pad), (255, 255, 255))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        tile = img.convert("RGB").resize((tw, th), Image.NEAREST) if scale > 1 else img.convert("RGB")
        grid.paste(tile, (pad + c * (tw + pad), pad + r * (th + pad)))
    return grid


__all__ = ["CONVERTED_MODES", "ImageLoadError", "ImageSource", "accepted_inputs", "image_grid", "load_image"]
