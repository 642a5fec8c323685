"""Turning what a caller has (a path, bytes, a numpy array) into an uploaded file."""

from __future__ import annotations

import io
import mimetypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ImageInput", "Upload", "to_upload"]

#: A file path, the bytes of an image file, or pixels: uint8 of shape (H, W), (H, W, 1),
#: (H, W, 3) or (H, W, 4), or floats in [0, 1] of those shapes.
ImageInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview, "np.ndarray"]

#: (file name, content, content type), as httpx takes a multipart file.
Upload = tuple[str, bytes, str]


def _array_png(pixels: Any) -> bytes:
    import numpy as np
    from PIL import Image

    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"an image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got {array.shape!r}"
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                "a float image array must hold values in [0, 1]; got values from "
                f"{float(np.nanmin(array))!r} to {float(np.nanmax(array))!r}"
            )
        array = np.rint(array * 255).astype(np.uint8)
    else:
        raise ValueError(f"an image array must be uint8 or float in [0, 1]; got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_upload(image: ImageInput, name: str | None = None) -> Upload:
    """``image`` as a file to post; ``name`` overrides the file name the service reports."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return name or path.name, path.read_bytes(), content_type
    if isinstance(image, bytes | bytearray | memoryview):
        return name or "image", bytes(image), "application/octet-stream"
    if hasattr(image, "__array__"):
        return name or "array.png", _array_png(image), "image/png"
    raise TypeError(
        "an image is a file path, the bytes of an image file or a numpy array; "
        f"got {type(image).__name__}"
    )
