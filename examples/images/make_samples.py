"""Re-create the sample images in this folder from the real data sets.

    python examples/images/make_samples.py [--data-dir ../shared/datasets]

Each file is one real test image, written as an 8-bit grayscale PNG exactly as stored
(28x28, white on black), except ``digit-7-scan.jpg``: the same 7 as a scanned form
shows it (dark ink on white paper, 112x112, JPEG), which the service's preprocessing
turns back into an MNIST-like input. The indices are fixed, so the files do not change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from training.data.base import resolve_data_dir
from training.data.mnist import load_mnist
from training.data.notmnist import load_notmnist

HERE = Path(__file__).resolve().parent

#: file name -> index into the MNIST test set (t10k), and the digit it shows.
MNIST_SAMPLES = {"digit-7.png": (0, 7), "digit-2.png": (1, 2), "digit-0.png": (3, 0)}
#: file name -> index into the notMNIST test set, and the letter it shows.
NOTMNIST_SAMPLES = {"letter-h.png": (4, "H")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="data sets folder")
    arguments = parser.parse_args(argv)
    data_dir = resolve_data_dir(arguments.data_dir)
    mnist = load_mnist(data_dir, "test")
    for name, (index, digit) in MNIST_SAMPLES.items():
        assert mnist.labels[index] == digit, (name, mnist.labels[index])
        Image.fromarray(mnist.images[index], mode="L").save(HERE / name, optimize=True)
    seven = Image.fromarray(255 - mnist.images[MNIST_SAMPLES["digit-7.png"][0]], mode="L")
    seven.resize((112, 112), Image.Resampling.BICUBIC).save(HERE / "digit-7-scan.jpg", quality=90)
    notmnist = load_notmnist(data_dir)
    for name, (index, letter) in NOTMNIST_SAMPLES.items():
        assert "ABCDEFGHIJ"[notmnist.labels[index]] == letter, (name, notmnist.labels[index])
        Image.fromarray(notmnist.images[index], mode="L").save(HERE / name, optimize=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
