"""One preprocessing from an image file to the network input, for service and pipeline.

The service applies it to every posted file and the training pipeline to every source
image that does not already come as a 28x28 white-on-black digit (DESIGN.md section 2),
so the meta classifiers learn from exactly what the service will see. No torch here.

Steps:

1. :func:`decode_image` - bytes to a Pillow image: :func:`open_image` reads the header
   and checks the pixels to decode (a large JPEG in draft mode, reduced by libjpeg) and
   the frame count before any pixel is decoded; :func:`load_first_frame` decodes the
   first frame only, applies the EXIF orientation and detects truncation by forcing the
   load. :func:`prepare_files` does both for the files of one request under one budget
   of pixels times frames. Every failure is an :class:`ImageDecodeError` (a
   ``ValueError``) whose message says what was wrong; a limit is an
   :class:`ImageTooLarge` that names it, so the service answers 413 rather than 422.
2. :func:`prepare_image` / :func:`prepare_array` - any colour mode to ITU-R 601 luma,
   transparency composited onto a background that contrasts with the visible content,
   inverted when the background is light (median of a border ring above
   ``LIGHT_BACKGROUND_LEVEL``), the background level subtracted so it becomes black,
   then MNIST framing: the bounding box of the ink (``INK_THRESHOLD``) scaled so its
   longer side is 20 px (Lanczos on the float image), pasted into 28x28 with its
   centre of mass at MNIST's centre, shifted no further than keeps it whole. An image
   with no ink (a blank or constant one) gives all zeros.

A 28x28 image is taken as already framed: it is only inverted when its background is
light, never rescaled, so a 28x28 white-on-black digit (an MNIST test image posted as
PNG) passes through bit for bit, and 28x28 noise keeps its distribution whichever way
the inversion rule falls.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageHeader",
    "ImageTooLarge",
    "JPEG_DRAFT_MIN_SIDE",
    "SUPPORTED_FORMATS",
    "SUPPORTED_MODES",
    "decode_image",
    "load_first_frame",
    "open_image",
    "prepare_array",
    "prepare_files",
    "prepare_image",
    "rebuild_error",
    "to_grayscale",
]

#: Default limit on the pixels :func:`decode_image` decodes (one frame, after JPEG draft
#: reduction). A digit needs a few thousand; 16 megapixels still takes a full-resolution
#: scan or screenshot, and a JPEG photo of any size decodes reduced far below it. Measured
#: here: a 16-megapixel PNG takes 0.4 s and 240 MB at the peak in gray, 2.5 s and 850 MB
#: with an alpha channel; the old default of 40 megapixels let a 140-byte animated WebP
#: with a 6000x6000 canvas cost 1.5 s and 940 MB.
DEFAULT_MAX_PIXELS = 16_000_000
#: Default limit on the frames an animation may declare (only the first is decoded, but
#: GIF and TIFF walk every frame header to count them).
DEFAULT_MAX_FRAMES = 100
#: A JPEG whose shorter side is longer than this is decoded in libjpeg's draft mode, at
#: the largest of 1/2, 1/4, 1/8 scale that keeps the shorter side at least this long:
#: about 18 times the digit box of MNIST framing, so a digit that fills a tenth of a
#: phone photo still has some 50 px before it is scaled to 20. A 6000x6600 JPEG then
#: decodes 750x825 pixels instead of 40 million.
JPEG_DRAFT_MIN_SIDE = 512

#: The formats of the HTTP contract (DESIGN.md section 5); Pillow's JPEG opener also
#: reads MPO, what many phone cameras write as ".jpg". Restricting Pillow's openers
#: keeps rarely used, less hardened decoders away from untrusted uploads.
SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")

#: Colour modes :func:`to_grayscale` turns into 8-bit luma.
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
    | {"RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)

#: The network's input side.
MNIST_SIZE = 28
#: MNIST scaled each digit so that it fits a 20x20 box, preserving the aspect ratio.
MNIST_BOX = 20
#: Where MNIST puts the centre of mass, in pixel-index coordinates. Measured on the
#: 10,000 MNIST test digits: mean (13.99, 14.01), std 0.29 - MNIST's "centre" of the
#: 28x28 field is index 14, not the geometric 13.5.
MNIST_CENTRE = 14.0

#: The border ring that decides the background is this fraction of the shorter side
#: (at least 1 px): wide enough that a scanner's dark edge line or a stroke touching the
#: border does not decide it, narrow enough to stay background on a tightly cropped digit.
BORDER_FRACTION = 0.05
#: Invert when the median luma of the border ring is above this level (out of 255): a
#: light background means dark ink, and the network was trained on white ink on black.
#: The median, not the mean, so strokes crossing the border do not tip the decision.
#: Exactly mid-grey, so an inverted image is never light again: preparing a prepared
#: image changes nothing (a noise PNG scores as the pipeline saw it).
LIGHT_BACKGROUND_LEVEL = 127.5

#: After inversion and background removal, pixels above this value (out of 255) count
#: as ink when finding the bounding box. About 10% of full scale: JPEG ringing and paper
#: grain on a flat background stay below it, while MNIST's own anti-aliased edges mostly
#: stay inside the box anyway because the strokes they border are above it.
INK_THRESHOLD = 24

#: When compositing transparency, visible content darker than this mean luma is dark ink
#: and goes onto white; lighter content goes onto black. Either way the ink contrasts
#: with the background, and step 2's inversion rule then sees an ordinary image.
DARK_CONTENT_LEVEL = 127.5

#: 16-bit samples map to 8 bits by this divisor (65535 / 255).
_SIXTEEN_TO_EIGHT_BITS = 257.0


class ImageDecodeError(ValueError):
    """The bytes are not an image this service can score; the message says why.

    ``index`` is the position of the offending file when :func:`prepare_files` read
    several, else None. Instances pickle with their attributes, and the decode workers
    send them to the server as JSON (``app/decoding.py``); both rebuild them with
    :func:`rebuild_error`.
    """

    index: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuild_error, (type(self), self.args, dict(self.__dict__))


class ImageTooLarge(ImageDecodeError):
    """Decoding would cost more than a limit allows: pixels, frames, or a request's total.

    Raised before any pixel is decoded. ``limit`` names the parameter that set the limit
    (``max_pixels``, ``max_frames`` or ``max_total_pixels``), so that a caller can name its
    own setting; ``value`` is what the file declares (None where only a lower bound is
    known) and ``subject`` says it in words ("image of 6000x6000 = 36000000 pixels").
    """

    def __init__(
        self, subject: str, *, limit: str, limit_value: int, value: int | None, unit: str
    ) -> None:
        super().__init__(f"{subject} is over the limit of {limit_value} {unit} ({limit})")
        self.subject = subject
        self.limit = limit
        self.limit_value = limit_value
        self.value = value
        self.unit = unit


def rebuild_error(
    cls: type[ImageDecodeError], args: tuple[Any, ...], state: dict[str, Any]
) -> ImageDecodeError:
    """An error of ``cls`` with these ``args`` and attributes, without its ``__init__``."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


@dataclass(frozen=True)
class ImageHeader:
    """What a file declares, read before any pixel is decoded.

    ``width`` x ``height`` is the declared size; ``decoded_width`` x ``decoded_height``
    is what will really be decoded (smaller for a large JPEG, which libjpeg decodes at
    1/2, 1/4 or 1/8 scale in draft mode). The limits apply to the decoded pixels.
    """

    format: str
    width: int
    height: int
    frames: int
    decoded_width: int
    decoded_height: int

    @property
    def pixels(self) -> int:
        """Pixels of the one frame that is decoded."""
        return self.decoded_width * self.decoded_height

    @property
    def budget_pixels(self) -> int:
        """What the file counts against a request's budget: pixels times frames."""
        return self.pixels * self.frames

    def describe(self) -> str:
        """The size in words, for error messages."""
        if (self.decoded_width, self.decoded_height) == (self.width, self.height):
            return f"image of {self.width}x{self.height} = {self.pixels} pixels"
        scale = round(self.width / self.decoded_width)
        return (
            f"{self.format} image of {self.width}x{self.height}, decoded at 1/{scale} scale to "
            f"{self.decoded_width}x{self.decoded_height} = {self.pixels} pixels"
        )


def open_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> tuple[Image.Image, ImageHeader]:
    """Open ``data`` and check what it declares, decoding no pixel.

    A large JPEG is put in draft mode first (libjpeg decodes it reduced, never below
    ``JPEG_DRAFT_MIN_SIDE`` on its shorter side), so the pixel limit counts what will be
    decoded. Returns the opened image, not yet loaded, and its header.

    Raises
    ------
    ImageTooLarge
        More decoded pixels than ``max_pixels`` or more frames than ``max_frames``.
    ImageDecodeError
        Empty data, not an image of a supported format, a corrupt header, no pixels or a
        colour mode :func:`prepare_image` cannot handle.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    for name, limit in (("max_pixels", max_pixels), ("max_frames", max_frames)):
        if limit < 1:
            raise ValueError(f"{name} must be a positive count, got {limit!r}")
    if len(data) == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    declared = _webp_canvas(data)
    if declared is not None and declared[0] * declared[1] > max_pixels:
        # Pillow's WebP reader allocates (and clears) the whole canvas as it opens the
        # file, some 80 ms for 6000x6000: refused from the bytes before Pillow sees them.
        width, height = declared
        raise ImageTooLarge(
            f"image of {width}x{height} = {width * height} pixels",
            limit="max_pixels",
            limit_value=max_pixels,
            value=width * height,
            unit="pixels",
        )
    # No warnings.catch_warnings here: it is not thread-safe. Pillow's own bomb guard
    # (Image.MAX_IMAGE_PIXELS) fires inside Image.open, before the size is ours to see;
    # the service's decode workers switch it off and rely on the exact check below.
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as error:
        kind = _unsupported_kind(data)
        raise ImageDecodeError(
            f"not an image in a supported format ({', '.join(SUPPORTED_FORMATS)}); "
            + (
                f"it looks like {kind}: convert it to PNG or JPEG first"
                if kind
                else f"{len(data)} bytes starting with {bytes(data[:8])!r}"
            )
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        guard = Image.MAX_IMAGE_PIXELS or 0
        raise ImageTooLarge(
            f"image of more than {guard} pixels (Pillow's decompression-bomb guard)",
            limit="max_pixels",
            limit_value=max_pixels,
            value=None,
            unit="pixels",
        ) from error
    except Exception as error:  # untrusted bytes: any decoder failure is the client's
        raise ImageDecodeError(f"corrupt image header: {error}") from error
    try:
        return image, _check_header(image, max_pixels, max_frames)
    except BaseException:
        image.close()
        raise


def _check_header(image: Image.Image, max_pixels: int, max_frames: int) -> ImageHeader:
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if image.mode not in SUPPORTED_MODES:
        raise ImageDecodeError(
            f"unsupported colour mode {image.mode!r} of a {image.format} image; "
            f"supported: {', '.join(sorted(SUPPORTED_MODES))}"
        )
    image_format = str(image.format)
    if image_format in ("JPEG", "MPO") and min(width, height) > JPEG_DRAFT_MIN_SIDE:
        factor = min(width, height) / JPEG_DRAFT_MIN_SIDE
        image.draft(image.mode, (int(width / factor), int(height / factor)))
    try:
        # Read from the header for PNG, WebP, MPO; GIF and TIFF walk their frame headers
        # (no pixel data is decoded). Only the first frame is ever decoded.
        frames = int(getattr(image, "n_frames", 1))
    except Exception as error:  # untrusted bytes: any decoder failure is the client's
        raise ImageDecodeError(f"corrupt {image_format} frame headers: {error}") from error
    header = ImageHeader(image_format, width, height, frames, *image.size)
    if header.pixels > max_pixels:
        raise ImageTooLarge(
            header.describe(),
            limit="max_pixels",
            limit_value=max_pixels,
            value=header.pixels,
            unit="pixels",
        )
    if frames > max_frames:
        raise ImageTooLarge(
            f"{image_format} animation of {frames} frames",
            limit="max_frames",
            limit_value=max_frames,
            value=frames,
            unit="frames",
        )
    return header


def load_first_frame(image: Image.Image, header: ImageHeader) -> Image.Image:
    """Decode the first frame of an image from :func:`open_image`, upright as shown.

    Loading is forced, so a truncated file fails here and not later.
    """
    try:
        image.seek(0)  # the first frame of an animation (a no-op on a still image)
        image.load()  # forces decoding, so truncation shows here
        return ImageOps.exif_transpose(image)  # phone photos: upright as shown
    except Exception as error:  # untrusted bytes: any decoder failure is the client's
        raise ImageDecodeError(
            f"truncated or corrupt {header.format} image data "
            f"({header.width}x{header.height}): {error}"
        ) from error


def decode_image(
    data: bytes | bytearray | memoryview,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Image.Image:
    """Decode ``data`` into a fully loaded Pillow image (first frame of an animation).

    :func:`open_image` then :func:`load_first_frame`: the limits are checked from the
    header before any pixel is decoded, so a decompression bomb costs nothing.

    Raises
    ------
    ImageTooLarge
        Over ``max_pixels`` or ``max_frames`` (an :class:`ImageDecodeError`).
    ImageDecodeError
        Empty data, not an image of a supported format, truncated or corrupt data, or a
        colour mode :func:`prepare_image` cannot handle.
    """
    image, header = open_image(data, max_pixels=max_pixels, max_frames=max_frames)
    return load_first_frame(image, header)


def prepare_files(
    files: Sequence[bytes | bytearray | memoryview],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_total_pixels: int | None = None,
    part: range | None = None,
) -> np.ndarray:
    """Several image files (one request) as network inputs, under one decode budget.

    Every header is read and checked first; then the files' pixels times frames together
    must stay within ``max_total_pixels``; only then is anything decoded. So a request
    over any limit costs no decoding at all.

    ``part`` decodes only those files (a contiguous range of indices), for a request
    split across decode workers: every header is still read and checked, so each part
    refuses a request over a limit exactly as the whole would.

    Returns
    -------
    ndarray of shape (n, 28, 28), uint8 (n = ``len(part)`` with a part).

    Raises
    ------
    ImageTooLarge, ImageDecodeError
        The first offending file (``index`` set), or the whole request over
        ``max_total_pixels`` (``index`` None).
    """
    opened: list[tuple[Image.Image, ImageHeader]] = []
    try:
        for index, data in enumerate(files):
            try:
                opened.append(open_image(data, max_pixels=max_pixels, max_frames=max_frames))
            except ImageDecodeError as error:
                error.index = index
                raise
        total = sum(header.budget_pixels for _, header in opened)
        if max_total_pixels is not None and total > max_total_pixels:
            raise ImageTooLarge(
                f"{len(opened)} images of {total} pixels in all (width x height x frames)",
                limit="max_total_pixels",
                limit_value=max_total_pixels,
                value=total,
                unit="pixels",
            )
        indices = range(len(opened)) if part is None else part
        if indices.step != 1 or not 0 <= indices.start <= indices.stop <= len(opened):
            raise ValueError(f"part must be a contiguous range within the files, got {part}")
        prepared = np.empty((len(indices), MNIST_SIZE, MNIST_SIZE), dtype=np.uint8)
        for row, index in enumerate(indices):
            image, header = opened[index]
            try:
                prepared[row] = _prepare_loaded(load_first_frame(image, header), header)
            except ImageDecodeError as error:
                error.index = index
                raise
            finally:
                image.close()
        return prepared
    finally:
        for image, _ in opened:
            image.close()


def _prepare_loaded(image: Image.Image, header: ImageHeader) -> np.ndarray:
    try:
        return prepare_image(image)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        # Anything else Pillow raises on hostile input is still the input's fault.
        raise ImageDecodeError(
            f"cannot process the {header.format} image ({header.width}x{header.height}): "
            f"{type(error).__name__}: {error}"
        ) from error


def _webp_canvas(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """The canvas size a WebP file declares in its first chunk, or None if it is no WebP.

    VP8X (extended, animations): 24-bit width and height minus one; VP8L (lossless):
    14-bit fields after the 0x2f signature; VP8 (lossy): 14-bit fields after the start
    code. A file too short to hold the fields gives None and is left to Pillow.
    """
    head = bytes(data[:30])
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(head[24:27], "little")
        height = 1 + int.from_bytes(head[27:30], "little")
        return width, height
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        height = int.from_bytes(head[28:30], "little") & 0x3FFF
        return width, height
    return None


#: ISO base-media brands of HEIC/HEIF and AVIF photos (what phones write), at bytes 8-12.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def _unsupported_kind(data: bytes | bytearray | memoryview) -> str | None:
    """What a file that is no supported image seems to be, when clients often send it."""
    head = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()  # BOM, whitespace
    if head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!doctype")) and b"<svg" in head):
        return "an SVG drawing (a vector format)"
    if head.startswith(b"%pdf-"):
        return "a PDF document"
    if bytes(data[4:8]) == b"ftyp" and bytes(data[8:12]) in _HEIF_BRANDS:
        return "a HEIC/HEIF or AVIF photo"
    return None


def prepare_image(image: Image.Image) -> np.ndarray:
    """A Pillow image of any supported mode and size as the network input.

    Returns
    -------
    ndarray of shape (28, 28), uint8, white ink on black in MNIST framing.
    """
    return _frame(to_grayscale(image))


def prepare_array(array: np.ndarray) -> np.ndarray:
    """A uint8 array, (H, W) grayscale or (H, W, 3) RGB, as the network input.

    Does what :func:`prepare_image` does for the same pixels as an 'L' or 'RGB' image.
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        gray = array
    elif array.ndim == 3 and array.shape[2] == 3:
        gray = np.asarray(Image.fromarray(array, "RGB").convert("L"))
    else:
        raise ValueError(f"array must have shape (H, W) or (H, W, 3), got {array.shape}")
    if gray.size == 0:
        raise ValueError(f"array has no pixels, shape {array.shape}")
    return _frame(gray)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """8-bit ITU-R 601 luma (what Pillow's 'L' conversion computes) of any supported mode.

    - 16-bit ('I;16*') scales by 1/257; 32-bit 'I' likewise when any value exceeds 255,
      otherwise it is taken as 8-bit data; values outside the range are clipped.
    - 'F' is taken as [0, 1] when its maximum is at most 1, else as [0, 255]; NaN is 0.
    - Alpha (and palette or colour-key transparency) is composited onto white when the
      visible content is dark, onto black when it is light (``DARK_CONTENT_LEVEL``).
    """
    mode = image.mode
    if mode not in SUPPORTED_MODES:
        raise ImageDecodeError(
            f"unsupported colour mode {mode!r}; supported: {', '.join(sorted(SUPPORTED_MODES))}"
        )
    if image.width == 0 or image.height == 0:
        raise ImageDecodeError(f"image has no pixels ({image.width}x{image.height})")
    # A colour key (tRNS) counts for the 8-bit modes; Pillow's RGBA conversion of
    # 16-bit and float modes clips instead of scaling, so their key is ignored.
    keyed = "transparency" in image.info and mode in ("1", "L", "P", "RGB")
    has_alpha = mode in ("LA", "PA", "RGBA", "RGBa") or keyed
    if has_alpha:
        return _composite_alpha(image.convert("RGBA"))
    if mode == "L":
        return np.array(image, dtype=np.uint8)
    if mode.startswith("I;16"):
        return _to_eight_bits(np.asarray(image).astype(np.float64) / _SIXTEEN_TO_EIGHT_BITS)
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.max() > 255:
            values = values / _SIXTEEN_TO_EIGHT_BITS
        return _to_eight_bits(values)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0)
        if values.max() <= 1.0:
            values = values * 255.0
        return _to_eight_bits(values)
    if mode in ("1", "RGB", "RGBX"):
        return np.asarray(image.convert("L"))
    # P, CMYK, YCbCr, LAB, HSV: through RGB, so the palette or colour space is honoured.
    return np.asarray(image.convert("RGB").convert("L"))


def _to_eight_bits(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _composite_alpha(rgba: Image.Image) -> np.ndarray:
    """Luma of an RGBA image composited onto white or black, whichever contrasts more."""
    alpha = np.asarray(rgba.getchannel("A")).astype(np.float64) / 255.0
    luma = np.asarray(rgba.convert("RGB").convert("L")).astype(np.float64)
    visible = alpha.sum()
    content = (luma * alpha).sum() / visible if visible > 0 else 0.0
    background = 255.0 if content < DARK_CONTENT_LEVEL else 0.0
    return _to_eight_bits(luma * alpha + background * (1.0 - alpha))


def _border_level(gray: np.ndarray) -> float:
    """Median luma of the border ring: the background level."""
    height, width = gray.shape
    ring = max(1, round(BORDER_FRACTION * min(height, width)))
    ring = min(ring, (min(height, width) + 1) // 2)
    border = np.concatenate(
        [
            gray[:ring].ravel(),
            gray[-ring:].ravel(),
            gray[ring:-ring, :ring].ravel(),
            gray[ring:-ring, -ring:].ravel(),
        ]
    )
    return float(np.median(border))


def _frame(gray: np.ndarray) -> np.ndarray:
    """Invert a light background, then frame like MNIST (28x28 input: invert only)."""
    background = _border_level(gray)
    if background > LIGHT_BACKGROUND_LEVEL:
        gray, background = 255 - gray, 255.0 - background
    if gray.shape == (MNIST_SIZE, MNIST_SIZE):
        return np.array(gray, dtype=np.uint8)  # already framed; a copy, never a view
    # The background becomes black, as in MNIST: a photo of grey paper or a constant
    # image has no ink, and the box is found around what stands out from the background.
    ink = np.clip(gray.astype(np.float32) - np.float32(background), 0.0, 255.0)
    return _mnist_framing(ink)


def _mnist_framing(ink: np.ndarray) -> np.ndarray:
    """Scale the ink's bounding box to 20 px (longer side), centre of mass to the centre.

    ``ink``: float32 (H, W) in 0..255, background 0.
    """
    is_ink = ink > INK_THRESHOLD
    if not is_ink.any():
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.uint8)
    rows, cols = np.flatnonzero(is_ink.any(axis=1)), np.flatnonzero(is_ink.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = MNIST_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Float image, so the antialiasing filter neither rounds nor clips on the way;
    # reducing_gap first box-reduces very large crops, which is much faster and
    # indistinguishable at 20 px.
    patch_image = Image.fromarray(crop, "F")
    patch_image = patch_image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    patch = np.clip(np.asarray(patch_image, dtype=np.float64), 0.0, 255.0)  # (h, w)

    total = patch.sum()
    patch_height, patch_width = patch.shape
    if total > 0:
        centre_y = (patch.sum(axis=1) * np.arange(patch_height)).sum() / total
        centre_x = (patch.sum(axis=0) * np.arange(patch_width)).sum() / total
    else:
        centre_y, centre_x = (patch_height - 1) / 2, (patch_width - 1) / 2
    # Shift so the centre of mass lands on MNIST's centre, clamped so nothing is cut off.
    top = int(np.clip(round(MNIST_CENTRE - centre_y), 0, MNIST_SIZE - patch_height))
    left = int(np.clip(round(MNIST_CENTRE - centre_x), 0, MNIST_SIZE - patch_width))
    framed = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float64)
    framed[top : top + patch_height, left : left + patch_width] = patch
    return _to_eight_bits(framed)
