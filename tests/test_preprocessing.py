"""scoring.preprocessing: decoding untrusted bytes and framing any image like MNIST."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from helpers_data import correlation, plus_sign, shared_data_dir
from PIL import Image

from scoring.preprocessing import (
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    load_first_frame,
    open_image,
    prepare_array,
    prepare_files,
    prepare_image,
)
from tools.harness import encode, png_claiming
from training.data.mnist import load_mnist


def prepared(data: bytes, **options) -> np.ndarray:
    result = prepare_image(decode_image(data, **options))
    assert result.dtype == np.uint8 and result.shape == (28, 28)
    return result


@pytest.fixture(scope="module")
def mnist_test_images() -> np.ndarray:
    return load_mnist(shared_data_dir("mnist"), "test").images


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The plus sign as the pipeline frames it from a plain 8-bit image."""
    return prepare_array(plus_sign())


def test_preprocessing_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, scoring.preprocessing; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- 28x28 passes unchanged; large images come back in MNIST framing -----------------


def test_mnist_png_passes_bit_exact(mnist_test_images):
    for image in mnist_test_images[:300]:
        np.testing.assert_array_equal(prepared(encode(Image.fromarray(image))), image)
        np.testing.assert_array_equal(prepare_array(image), image)


def test_28x28_white_on_black_passes_bit_exact_without_real_data():
    rng = np.random.default_rng(0)
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 6:22] = rng.integers(0, 256, (20, 16), dtype=np.uint8)
    np.testing.assert_array_equal(prepared(encode(Image.fromarray(image))), image)
    rgb = np.repeat(image[:, :, None], 3, axis=2)  # gray as RGB: luma is exact
    np.testing.assert_array_equal(prepared(encode(Image.fromarray(rgb))), image)
    assert prepare_array(image) is not image  # a copy, never the caller's array


def test_28x28_dark_on_light_is_inverted_only(mnist_test_images):
    image = mnist_test_images[0]
    np.testing.assert_array_equal(prepare_array(255 - image), image)


def test_dark_digit_on_large_white_canvas_comes_back_framed(mnist_test_images):
    correlations = []
    for image in mnist_test_images[:200]:
        digit = Image.fromarray(255 - image).resize((180, 180), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (300, 200), 255)
        canvas.paste(digit, (90, 5))
        correlations.append(correlation(prepared(encode(canvas)), image))
    # Differences left: the antialiasing and a pixel of rounding in the centring.
    assert np.median(correlations) > 0.95
    assert np.mean(correlations) > 0.9
    assert min(correlations) > 0.5


def test_framing_box_and_centre_of_mass():
    wide = np.zeros((100, 300), np.uint8)
    wide[40:60, 20:260] = 255  # a 240x20 bar: longer side becomes 20 px
    framed = prepare_array(wide)
    rows, cols = np.flatnonzero(framed.any(1)), np.flatnonzero(framed.any(0))
    assert cols[-1] - cols[0] + 1 == 20
    assert rows[-1] - rows[0] + 1 <= 4
    weights = framed.astype(float)
    centre = [(weights.sum(axis) * np.arange(28)).sum() / weights.sum() for axis in (1, 0)]
    np.testing.assert_allclose(centre, [14.0, 14.0], atol=0.75)


def test_ink_in_a_corner_is_not_cut_off():
    corner = np.zeros((200, 200), np.uint8)
    corner[0:60, 0:8] = 255  # a thin vertical stroke at the very edge
    corner[0:8, 0:60] = 255  # and a horizontal one: mass sits far from the centre
    framed = prepare_array(corner)
    assert framed.sum() > 0.8 * prepare_array(np.pad(corner, 50)).sum()


@pytest.mark.parametrize("value", [0, 40, 200, 255])
def test_blank_image_gives_all_zero(value):
    assert not prepare_array(np.full((50, 70), value, np.uint8)).any()


def test_light_and_dark_background_give_the_same_digit(reference):
    np.testing.assert_array_equal(prepare_array(255 - plus_sign()), reference)
    assert reference.max() == 255 and reference[0].max() == 0


def test_large_photo_is_quick():
    photo = np.full((3000, 4000), 230, np.uint8)
    photo[800:2400, 1500:1900] = 20
    start = time.perf_counter()
    framed = prepare_array(photo)
    assert time.perf_counter() - start < 2.0
    assert framed.max() > 200


# --- every colour mode a user may send -------------------------------------------


def mode_variants() -> dict[str, bytes]:
    ink = plus_sign()  # black ink on white, 8-bit
    mask = ink < 128
    gray = Image.fromarray(ink)
    rgb = np.stack([ink, ink // 2 + 64 * mask, ink], axis=2).astype(np.uint8)
    transparent_ink = np.zeros(ink.shape + (4,), np.uint8)  # black ink, clear background
    transparent_ink[..., 3] = 255 * mask
    light_ink = transparent_ink.copy()  # white ink on a clear background
    light_ink[..., :3] = 255
    la = np.stack([ink, 255 * mask.astype(np.uint8)], axis=2)
    palette = gray.convert("P")
    palette.info["transparency"] = int(palette.getpixel((0, 0)))  # the background colour
    frames = [gray, Image.fromarray(255 - ink)]  # a second, different frame
    return {
        "L": encode(gray),
        "1": encode(gray.convert("1")),
        "I;16": encode(Image.fromarray(ink.astype(np.uint16) * 257)),
        "I (32-bit TIFF)": encode(Image.fromarray(ink.astype(np.int32) * 257), "TIFF"),
        "F (TIFF 0..1)": encode(Image.fromarray(ink.astype(np.float32) / 255), "TIFF"),
        "RGB JPEG": encode(Image.fromarray(rgb), "JPEG", quality=95),
        "CMYK JPEG": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "CMYK TIFF": encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
        "P with transparency": encode(palette, transparency=palette.info["transparency"]),
        "LA": encode(Image.fromarray(la, "LA")),
        "RGBA dark ink": encode(Image.fromarray(transparent_ink, "RGBA")),
        "RGBA light ink": encode(Image.fromarray(light_ink, "RGBA")),
        "RGBA WebP": encode(Image.fromarray(transparent_ink, "RGBA"), "WEBP", lossless=True),
        "BMP": encode(Image.fromarray(rgb), "BMP"),
        "GIF animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }


@pytest.mark.parametrize(("mode", "data"), mode_variants().items(), ids=mode_variants().keys())
def test_every_mode_decodes_and_prepares_to_the_same_digit(mode, data, reference):
    result = prepared(data)
    assert correlation(result, reference) > 0.95, mode


def test_animated_gif_uses_the_first_frame():
    first, second = plus_sign(), np.full((120, 120), 255, np.uint8)
    second[10:30, 10:110] = 0
    data = encode(
        Image.fromarray(first), "GIF", save_all=True, append_images=[Image.fromarray(second)]
    )
    assert Image.open(__import__("io").BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(prepared(data), prepare_array(first))


def test_sixteen_bit_scales_to_eight_bits():
    image = np.zeros((28, 28), np.uint16)
    image[10, 10], image[11, 11] = 65535, 257 * 100
    result = prepared(encode(Image.fromarray(image)))
    assert (result[10, 10], result[11, 11]) == (255, 100)


def test_exif_orientation_is_applied():
    upright = plus_sign()
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down; viewers rotate it by 180 degrees
    data = encode(Image.fromarray(upright[::-1, ::-1].copy()), "JPEG", exif=exif, quality=95)
    assert correlation(prepared(data), prepare_array(upright)) > 0.95


def test_unsupported_mode_is_a_decode_error():
    with pytest.raises(ImageDecodeError, match=re.escape("unsupported colour mode 'La'")):
        prepare_image(Image.new("La", (30, 30)))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((28, 28), np.float32), "array must be uint8, got float32"),
        (
            np.zeros((28, 28, 4), np.uint8),
            "array must have shape (H, W) or (H, W, 3), got (28, 28, 4)",
        ),
        (np.zeros((0, 28), np.uint8), "array has no pixels, shape (0, 28)"),
    ],
)
def test_prepare_array_validates_its_argument(array, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare_array(array)


# --- decode errors: a clear message for every kind of bad upload ------------------


def test_empty_data():
    with pytest.raises(ImageDecodeError, match=re.escape("empty image data (0 bytes)")):
        decode_image(b"")


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match=r"not an image in a supported format \(PNG, JPEG"):
        decode_image(b"%PDF-1.7 definitely not a picture")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "an SVG drawing"),
        (b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="x"/>', "an SVG drawing"),
        (b"<!DOCTYPE svg PUBLIC><svg/>", "an SVG drawing"),
        (b"%PDF-1.7 definitely not a picture", "a PDF document"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic", "a HEIC/HEIF or AVIF photo"),
    ],
)
def test_formats_clients_often_send_are_named(data, kind):
    message = f"supported format (PNG, JPEG, BMP, TIFF, GIF, WEBP); it looks like {kind}"
    with pytest.raises(ImageDecodeError, match=re.escape(message)):
        decode_image(data)


def test_unknown_bytes_are_quoted():
    with pytest.raises(ImageDecodeError, match=re.escape("11 bytes starting with b'<html><s'")):
        decode_image(b"<html><svg>")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_file(image_format):
    noisy = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), image_format)
    with pytest.raises(ImageDecodeError, match=f"truncated or corrupt {image_format} image data"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_from_the_header():
    data = png_claiming(8000, 6000)  # 48 megapixels claimed in under 100 bytes
    message = (
        "image of 8000x6000 = 48000000 pixels is over the limit of 16000000 pixels (max_pixels)"
    )
    with pytest.raises(ImageTooLarge, match=re.escape(message)) as raised:
        decode_image(data)
    error = raised.value
    assert (error.limit, error.limit_value, error.value, error.unit) == (
        "max_pixels",
        16_000_000,
        48_000_000,
        "pixels",
    )
    assert error.subject == "image of 8000x6000 = 48000000 pixels"


def test_real_image_over_a_small_limit():
    data = encode(Image.new("L", (300, 200), 255))
    message = "image of 300x200 = 60000 pixels is over the limit of 50000 pixels (max_pixels)"
    with pytest.raises(ImageTooLarge, match=re.escape(message)):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000).size == (300, 200)


def test_pillow_bomb_guard_becomes_image_too_large():
    # 2.5 gigapixels: Pillow's own guard fires while opening, before our check.
    with pytest.raises(ImageTooLarge, match="decompression-bomb guard") as raised:
        decode_image(png_claiming(50_000, 50_000))
    assert raised.value.limit == "max_pixels" and raised.value.value is None


def test_a_large_jpeg_is_decoded_reduced_and_counted_at_that_size():
    photo = np.full((2400, 3200), 235, np.uint8)  # dark ink on light paper
    photo[600:1800, 1400:1800] = 15
    data = encode(Image.fromarray(photo), "JPEG", quality=90)
    image, header = open_image(data, max_pixels=1_000_000)  # 7.7 megapixels declared
    assert (header.width, header.height) == (3200, 2400)
    # 1/4 scale: the largest reduction that keeps the shorter side at 512 or more.
    assert (header.decoded_width, header.decoded_height) == (800, 600)
    assert load_first_frame(image, header).size == (800, 600)
    full = prepare_array(photo)
    assert correlation(prepared(data), full) > 0.98
    with pytest.raises(ImageTooLarge, match=re.escape("JPEG image of 3200x2400, decoded at 1/4")):
        open_image(data, max_pixels=400_000)


def test_frame_count_is_checked_before_decoding():
    frames = [Image.new("L", (8, 8), level) for level in range(0, 250, 10)]  # 25 frames
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    _, header = open_image(data)
    assert header.frames == 25 and header.budget_pixels == 25 * 64
    message = "GIF animation of 25 frames is over the limit of 10 frames (max_frames)"
    with pytest.raises(ImageTooLarge, match=re.escape(message)):
        decode_image(data, max_frames=10)


def test_prepare_files_checks_every_header_and_the_budget_before_decoding():
    small = encode(Image.fromarray(plus_sign()))  # 120x120
    files = [small, small, small]
    prepared_files = prepare_files(files, max_total_pixels=3 * 120 * 120)
    assert prepared_files.shape == (3, 28, 28) and prepared_files.dtype == np.uint8
    np.testing.assert_array_equal(prepared_files[1], prepare_array(plus_sign()))
    message = "3 images of 43200 pixels in all (width x height x frames) is over the limit"
    with pytest.raises(ImageTooLarge, match=re.escape(message)) as raised:
        prepare_files(files, max_total_pixels=3 * 120 * 120 - 1)
    assert raised.value.index is None and raised.value.limit == "max_total_pixels"
    # A bad header anywhere is found before the first file is decoded: the truncated
    # first file is never reached.
    truncated = small[: len(small) // 2]
    with pytest.raises(ImageTooLarge) as raised:
        prepare_files([truncated, small, png_claiming(100_000, 100_000)])
    assert raised.value.index == 2
    with pytest.raises(ImageDecodeError, match="truncated or corrupt PNG") as raised:
        prepare_files([small, truncated])
    assert raised.value.index == 1


def test_decode_errors_pickle_with_their_details():
    import pickle

    error = ImageTooLarge(
        "image of 2x2 = 4 pixels", limit="max_pixels", limit_value=3, value=4, unit="pixels"
    )
    error.index = 5
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ImageTooLarge and str(copy) == str(error)
    assert (copy.index, copy.limit, copy.limit_value, copy.value, copy.subject) == (
        5,
        "max_pixels",
        3,
        4,
        "image of 2x2 = 4 pixels",
    )


def test_decode_error_is_a_value_error():
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.filterwarnings("error")
def test_pillow_bomb_warning_range_is_a_decode_error_even_when_warnings_are_errors():
    # 100 megapixels: above Pillow's warning limit (89M), below its error limit.
    with pytest.raises(ImageTooLarge, match="decompression-bomb guard|is over the limit"):
        decode_image(png_claiming(10_000, 10_000))


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {"quality": 80}), ("L", {"lossless": True}), ("RGBA", {"lossless": True})],
    ids=["lossy VP8", "lossless VP8L", "alpha"],
)
def test_a_webp_canvas_is_read_from_its_first_chunk(mode, options):
    data = encode(Image.new(mode, (1234, 567)), "WEBP", **options)
    _, header = open_image(data)
    assert (header.width, header.height) == (1234, 567)
    message = "image of 1234x567 = 699678 pixels is over the limit of 600000 pixels"
    with pytest.raises(ImageTooLarge, match=re.escape(message)):
        open_image(data, max_pixels=600_000)


def test_an_animated_webp_bomb_is_refused_before_pillow_opens_it():
    frames = [Image.new("L", (6000, 6000), level) for level in (0, 255)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert len(data) < 1000  # 36 megapixels in a few hundred bytes
    with pytest.raises(ImageTooLarge, match=re.escape("image of 6000x6000 = 36000000")):
        open_image(data)
