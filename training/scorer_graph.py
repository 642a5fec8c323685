"""The scorer graph: forward pass plus an explicit per-sample backward, exported to ONNX.

Exporters cannot trace autograd (``vmap(grad)``, ``autograd.grad``) into ONNX, so this
module writes the backward pass of :class:`training.model.PaperCNN` by hand with plain
tensor ops (DESIGN.md section 2): one rule per layer type, applied per sample.

- Linear: weight gradient = outer(output grad, input); its statistics come in closed
  form from the two factors (sum of powers of an outer product = product of the
  factors' sums of powers), so the (B, 10, 784) tensor is never built.
- Conv2d: weight gradient per sample = output grads (B, O, HW) @ input patches
  (B, HW, C*9), one batched matmul; the patches (im2col) come from a depthwise conv
  with one-hot kernels (exact copies), one pass instead of nine Slice ops and a Concat
  (the grouped-conv trick for the weight gradient needs groups = B, an ONNX attribute
  that cannot follow a dynamic batch). Input gradient = a conv with the flipped,
  transposed kernel (a constant in the graph).
- conv1 and conv2, whose outputs are max-pooled, run as matmuls on those same patches,
  taken in 2x2 *window layout* (pixel order window position, then window), so max
  pooling reduces over an axis of its own and the forward reuses the backward's
  patches; conv2's input gradient goes back to pixel layout by depth-to-space (the
  window layout is its channel order) and through a "same" conv with the flipped kernel.
- LeakyReLU: multiply by 1 where the pre-activation is > 0, else by the slope.
- MaxPool2d (2x2, stride 2): the gradient goes to the FIRST maximum of each window in
  row-major order, as PyTorch routes it; an "equals the max" mask would send it to all
  four pixels of an all-zero window, which MNIST has plenty of. Pooling and the leaky
  ReLU backward are folded into one factor computed in the forward pass.
- Dropout: identity (eval mode); Flatten: a reshape.

Node count: at batch 1 the graph's time is mostly onnxruntime's per-node overhead (about
2 us a node on one thread), so the statistics of all layers are computed together, each
layer a column of one ``(B, K)`` tensor per moment (:class:`Moments`), and every reshape
takes its sizes from the model's Python ints (a size read off a traced tensor exports as
Shape/Gather/Concat nodes). That took the optimized member graph from 594 to 323 nodes
and its batch-1 latency from 1.65 to 1.30 ms (member 0 of the default bundle, one
thread, interleaved), at the same throughput.

Numerics: max pooling (and the leaky ReLU's kink) is a discontinuity of the per-sample
gradient: where two pre-activations of a window differ by less than float32's rounding
(1e-8 apart in a uniform-noise image is enough), a float32 forward can pick another
maximum than the float64 reference, the gradient goes to another pixel and skewness or
kurtosis move by far more than the tolerance. So conv1 and conv2 accumulate in float64
(their input patches and weights are float32 values, exact in float64; conv2's input,
the float64 pooled conv1 output, enters as its float32 part in a float64 matmul plus its
float32 remainder through a float32 conv), the window maximum and its position are taken
on the float64 pre-activations (the leaky ReLU is increasing, so it is applied to the
pooled values only, as is the bias), and the rest runs in float32: the weight gradients,
the backward and the reductions. The loss gradient at the logits, ``p - onehot(y)``, is
computed as ``p_i`` for i != y and ``-sum_{i != y} p_i`` at y (no ``p_y - 1``
cancellation), and divided by ``s = max_{i != y} p_i`` so that the whole backward runs
on O(1) numbers (no float32 underflow for confident predictions); the scale-free
statistics (skewness, kurtosis) need nothing more, the others are multiplied by ``s`` at
the end. Central moments are taken about each layer's mean, and "all" combines the
layers' partial moments exactly (shift formulas), so no raw fourth powers cancel.
(Routing in float32 and recomputing in float64 only the images with a window closer to
a tie than a rigorous float32 rounding bound was measured: a quarter of MNIST digits
and most notMNIST letters have such a window, so it would not pay; README, Performance.)

:func:`export_scorer_graph` exports one member or a whole ensemble, runs the file in
onnxruntime against :func:`training.reference.reference_scores` (float64) and writes it
only when they agree.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scoring.engine import INPUT_NAME, OUTPUT_NAMES, ScorerEngine
from scoring.features import IMAGE_SIZE, LAYER_NAMES, METRIC_NAMES
from training.model import PaperCNN, channel_statistics, images_to_tensor
from training.reference import reference_scores

__all__ = [
    "EnsembleScorerGraph",
    "MemberScorerGraph",
    "ScorerExportError",
    "export_scorer_graph",
]

#: Opset of the legacy (TorchScript) exporter; 17 is well supported by onnxruntime.
OPSET_VERSION = 17
#: Max-pooling window and stride of PaperCNN.
POOL = 2


class ScorerExportError(RuntimeError):
    """The exported graph disagrees with the torch reference; nothing was written."""


@dataclass(frozen=True)
class Moments:
    """Partial statistics of ``K`` parts' gradient vectors, per sample: each field ``(B, K)``.

    A layer is one part; :meth:`join` puts parts side by side and :func:`combine_moments`
    merges them. Keeping the parts as columns of one tensor, not as separate ``(B,)``
    tensors, makes every step one node for all layers at once: at batch 1 the graph's cost
    is mostly per-node overhead (about 2 us a node on one thread).
    """

    count: torch.Tensor  # (K,) vector lengths, a constant
    mean: torch.Tensor
    m2: torch.Tensor  # sum of (v - mean)^2
    m3: torch.Tensor
    m4: torch.Tensor
    abs_sum: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor

    @staticmethod
    def join(parts: Sequence[Moments]) -> Moments:
        """The parts' columns side by side: ``K = sum of the parts' K``."""
        return Moments(
            *(
                torch.cat([getattr(part, field.name) for part in parts], dim=-1)
                for field in dataclasses.fields(Moments)
            )
        )


def vector_moments(vectors: torch.Tensor) -> Moments:
    """Partial statistics of each row of ``vectors`` ``(B, N)``, one part: fields ``(B, 1)``."""
    count = vectors.shape[1]
    mean = vectors.sum(dim=1, keepdim=True) / count  # (B, 1)
    centred = vectors - mean  # (B, N)
    squared = centred * centred
    return Moments(
        count=torch.tensor([float(count)], device=vectors.device),
        mean=mean,
        m2=squared.sum(dim=1, keepdim=True),
        m3=(squared * centred).sum(dim=1, keepdim=True),
        m4=(squared * squared).sum(dim=1, keepdim=True),
        abs_sum=torch.linalg.vector_norm(vectors, ord=1, dim=1, keepdim=True),
        minimum=vectors.amin(dim=1, keepdim=True),
        maximum=vectors.amax(dim=1, keepdim=True),
    )


def combine_moments(parts: Moments) -> Moments:
    """Moments of the concatenation of the ``K`` parts' vectors, exactly (Pebay's shift formulas).

    Each part's central sums are shifted from its own mean to the common mean by
    ``delta = mean_part - mean``; since the part's centred values sum to zero,
    sum (v - mean)^k = sum_j C(k, j) delta^(k - j) M_j over j in {0, 2, ..., k}.
    Returns one part (fields ``(B, 1)``).
    """
    count = parts.count  # (K,)
    total = count.sum(dim=0, keepdim=True)  # (1,)
    mean = (parts.mean * count).sum(dim=1, keepdim=True) / total  # (B, 1)
    delta = parts.mean - mean  # (B, K)
    delta2 = delta * delta
    m2 = parts.m2 + count * delta2
    m3 = parts.m3 + 3.0 * delta * parts.m2 + count * delta2 * delta
    m4 = parts.m4 + 4.0 * delta * parts.m3 + 6.0 * delta2 * parts.m2 + count * delta2 * delta2
    return Moments(
        count=total,
        mean=mean,
        m2=m2.sum(dim=1, keepdim=True),
        m3=m3.sum(dim=1, keepdim=True),
        m4=m4.sum(dim=1, keepdim=True),
        abs_sum=parts.abs_sum.sum(dim=1, keepdim=True),
        minimum=parts.minimum.amin(dim=1, keepdim=True),
        maximum=parts.maximum.amax(dim=1, keepdim=True),
    )


def outer_product_moments(left: torch.Tensor, right: torch.Tensor) -> Moments:
    """Moments of the flattened outer products ``left[:, i] * right[:, j]`` without building them.

    ``left`` (B, I), ``right`` (B, J); one part (fields ``(B, 1)``). Power sums of an
    outer product factor: sum_ij (l_i r_j)^k = (sum_i l_i^k)(sum_j r_j^k). Central sums
    follow from the power sums by the binomial expansion about the mean; for the dense
    layer the mean is ~0 (the logit gradient sums to zero), so the expansion does not
    cancel.
    """
    count = left.shape[1] * right.shape[1]

    def power_sums(factor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        squared = factor * factor
        return tuple(
            power.sum(dim=1, keepdim=True)
            for power in (factor, squared, squared * factor, squared * squared)
        )  # each (B, 1)

    power = [a * b for a, b in zip(power_sums(left), power_sums(right), strict=True)]
    mean = power[0] / count
    mean2 = mean * mean
    m2 = power[1] - count * mean2
    m3 = power[2] - 3.0 * mean * power[1] + 2.0 * count * mean2 * mean
    m4 = power[3] - 4.0 * mean * power[2] + 6.0 * mean2 * power[1] - 3.0 * count * mean2 * mean2
    # The extremes of l_i r_j are products of the factors' extremes.
    left_extremes = torch.cat(
        [left.amin(dim=1, keepdim=True), left.amax(dim=1, keepdim=True)], dim=1
    )  # (B, 2)
    right_extremes = torch.cat(
        [right.amin(dim=1, keepdim=True), right.amax(dim=1, keepdim=True)], dim=1
    )  # (B, 2)
    corners = (left_extremes[:, :, None] * right_extremes[:, None, :]).flatten(1)  # (B, 4)
    return Moments(
        count=torch.tensor([float(count)], device=left.device),
        mean=mean,
        m2=m2,
        m3=m3,
        m4=m4,
        abs_sum=torch.linalg.vector_norm(left, ord=1, dim=1, keepdim=True)
        * torch.linalg.vector_norm(right, ord=1, dim=1, keepdim=True),
        minimum=corners.amin(dim=1, keepdim=True),
        maximum=corners.amax(dim=1, keepdim=True),
    )


def moments_to_metrics(moments: Moments, scale: torch.Tensor) -> torch.Tensor:
    """The seven statistics ``(B, K, 7)`` of each part, whose true values are ``scale`` times these.

    ``scale`` ``(B, 1)``.
    """
    count = moments.count  # (K,)
    m2 = moments.m2 / count
    degenerate = m2 <= 0
    safe_m2 = torch.where(degenerate, 1.0, m2)
    skewness = torch.where(degenerate, 0.0, (moments.m3 / count) / safe_m2**1.5)
    kurtosis = torch.where(degenerate, 0.0, (moments.m4 / count) / (safe_m2 * safe_m2) - 3.0)
    # sum of squares about zero from the central moment: M2 + n * mean^2.
    squares = moments.m2 + count * moments.mean * moments.mean
    scaled = (
        torch.stack(
            [moments.abs_sum, torch.sqrt(squares), moments.minimum, moments.maximum, moments.mean],
            dim=2,
        )
        * scale[:, :, None]
    )  # (B, K, 5)
    return torch.cat([scaled, torch.stack([skewness, kurtosis], dim=2)], dim=2)  # (B, K, 7)


def window_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Kernel that computes a "same" conv directly in 2x2 pooling-window layout.

    ``weight`` ``(O, C, k, k)`` -> ``(O * 4, C, k + 1, k + 1)``: output channel
    ``o * 4 + p`` (p = dh * 2 + dw, row-major in the window) at stride 2 is the conv
    output at pixel ``(2i + dh, 2j + dw)``. Pooling then reduces over an axis of its
    own, and the backward never transposes pixels in and out of windows.
    """
    out_channels, in_channels, kernel, _ = weight.shape
    expanded = weight.new_zeros(out_channels, POOL * POOL, in_channels, kernel + 1, kernel + 1)
    for row in range(POOL):
        for column in range(POOL):
            position = row * POOL + column
            expanded[:, position, :, row : row + kernel, column : column + kernel] = weight
    return expanded.reshape(out_channels * POOL * POOL, in_channels, kernel + 1, kernel + 1)


def patch_kernel(in_channels: int, kernel: int, windowed: bool) -> torch.Tensor:
    """One-hot depthwise kernel whose conv is im2col: a copy of each input shifted per tap.

    Output channel ``c * k*k + t`` (``windowed``: ``(c * k*k + t) * 4 + p``) is input
    channel ``c`` shifted by tap ``t``; with ``groups=in_channels`` the result reshapes
    to patches ``(B, C*k*k, HW)`` whose rows match ``weight.reshape(O, C*k*k)`` and whose
    columns match the output gradient's pixel order (plain or window layout).
    """
    taps = kernel * kernel
    if not windowed:
        eye = torch.eye(taps).reshape(taps, 1, kernel, kernel)
        return eye.repeat(in_channels, 1, 1, 1)  # (C * k*k, 1, k, k)
    one_tap = torch.eye(taps).reshape(taps, 1, 1, kernel, kernel)
    return window_kernel(one_tap.reshape(taps, 1, kernel, kernel)).repeat(in_channels, 1, 1, 1)


def pool_windows(
    windows: torch.Tensor, slope: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaky ReLU + 2x2 max pool on pre-activations in window layout, and the backward factor.

    ``windows`` ``(B, C, 4, h, w)``, any float dtype, plus ``bias`` ``(C, 1, 1)``
    (constant over a window, so it is added after pooling, on a quarter of the values).
    Returns the pooled activations ``(B, C, h, w)`` in that dtype and ``(B, C, 4, h,
    w)`` in float32: the leaky ReLU derivative at the FIRST maximum of each window
    (PyTorch's tie rule) and 0 elsewhere, so that the backward through pool and
    activation is one multiplication. The leaky ReLU (slope > 0) is strictly increasing,
    so the window's first maximum is that of the pre-activations and the activation is
    applied to the pooled values only.
    """
    # Elementwise over the four positions, not ArgMax/ReduceMax over the window axis:
    # onnxruntime reduces a middle axis slowly (this took the graph from 82.9 to 75.9 ms
    # at batch 256, member 0, one thread; the same at batch 1).
    positions = windows.unbind(dim=2)  # 4 x (B, C, h, w), row-major in the window
    maximum = functools.reduce(torch.maximum, positions)
    # One-hot of the FIRST maximum: a position is it if it equals the maximum and no
    # earlier one does (exact ties are common: all-zero patches).
    first_hot = [positions[0] == maximum]
    earlier = first_hot[0]
    for position in positions[1:-1]:
        first_hot.append((position == maximum) & ~earlier)
        earlier = earlier | first_hot[-1]
    first_hot.append(~earlier)
    if bias is not None:
        maximum = maximum + bias
    pooled = torch.maximum(maximum, slope * maximum)  # leaky ReLU for 0 < slope <= 1
    slopes = torch.where(maximum > 0, 1.0, slope).float()  # PyTorch: slope where x <= 0
    # A cast and a multiplication; a broadcasting Where took 7.5% of the graph.
    factor = torch.stack(first_hot, dim=2).float() * slopes[:, :, None]
    return pooled, factor  # (B, C, h, w), (B, C, 4, h, w)


class MemberScorerGraph(nn.Module):
    """Forward pass and explicit per-sample backward of one :class:`PaperCNN`.

    ``forward(images (B, 1, 28, 28))`` -> probabilities ``(B, 10)``, entropy ``(B,)``,
    gradient metrics ``(B, 5, 7)`` (LAYER_NAMES x METRIC_NAMES).

    conv1 and conv2, whose outputs are max-pooled, run in float64 (module docstring,
    "Numerics"); everything else in float32.
    """

    def __init__(self, model: PaperCNN) -> None:
        super().__init__()
        config = model.config
        if config.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for a 'same' conv, got {config.kernel_size}")
        if not 0.0 < config.leaky_relu_slope <= 1.0:  # pool_windows relies on it
            raise ValueError(f"leaky_relu_slope must be in (0, 1], got {config.leaky_relu_slope}")
        self.slope = float(config.leaky_relu_slope)
        self.kernel = int(config.kernel_size)
        self.filters = int(config.filters)
        self.padding = self.kernel // 2
        layers = {name: layer for name, layer in model.layers().items()}
        weights = {name: layer.weight.detach().float().clone() for name, layer in layers.items()}
        biases = {name: layer.bias.detach().float().clone() for name, layer in layers.items()}
        # conv1 and conv2 (max-pooled) as matmuls on their im2col patches in window
        # layout, in float64 (exact copies of the float32 weights).
        for name in ("conv1", "conv2"):
            self.register_buffer(f"{name}_matrix", weights[name].flatten(1).double())
            self.register_buffer(f"{name}_pool_bias", biases[name].double()[:, None, None])
        self.register_buffer("image_patches", patch_kernel(1, self.kernel, windowed=True))
        self.register_buffer(
            "pooled1_patches", patch_kernel(self.filters, self.kernel, windowed=True)
        )
        # conv2 in window layout, for the low-order part of its input.
        self.register_buffer("conv2_window_weight", window_kernel(weights["conv2"]))
        self.register_buffer("conv3_weight", weights["conv3"])
        self.register_buffer("conv3_bias", biases["conv3"])
        # Input gradient of a stride-1 "same" conv: conv with the kernel flipped in space
        # and in/out channels swapped.
        for name in ("conv2", "conv3"):
            self.register_buffer(
                f"{name}_backward", weights[name].flip(2, 3).transpose(0, 1).contiguous()
            )
        self.register_buffer("dense_weight", weights["dense"])
        self.num_classes = int(weights["dense"].shape[0])  # the data set's, 10 for digits
        self.register_buffer("dense_bias", biases["dense"])
        self.register_buffer(
            "pooled2_patches", patch_kernel(self.filters, self.kernel, windowed=False)
        )

    def patches(
        self, inputs: torch.Tensor, patches: torch.Tensor, channels: int, side: int
    ) -> torch.Tensor:
        """im2col by a one-hot depthwise conv: ``(B, C, H, W)`` -> ``(B, C*k*k, HW)``.

        Exact copies of the inputs (every product but one is by zero); windowed kernels
        (``k + 1`` wide, stride 2) give the columns in window layout. ``channels`` (C) and
        ``side`` (H = W) are the model's, as Python ints: a shape read off a traced tensor
        would export as shape arithmetic nodes, which cost per call at batch 1.
        """
        stride = POOL if patches.shape[-1] == self.kernel + 1 else 1
        columns = F.conv2d(
            inputs, patches, stride=stride, padding=self.padding, groups=channels
        )  # (B, C*k*k [*4], h, w)
        return columns.reshape(-1, channels * self.kernel * self.kernel, side * side)

    def pooled_conv(
        self, columns: torch.Tensor, name: str, side: int, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """conv + leaky ReLU + 2x2 max pool from window-layout patches ``(B, C*k*k, 4*side^2)``.

        Returns the pooled activations ``(B, O, h, w)`` (float64) and the backward factor
        ``(B, O, 4, h, w)`` (see :func:`pool_windows`).
        """
        windows = torch.matmul(getattr(self, f"{name}_matrix"), columns)  # (B, O, 4*side^2)
        if extra is not None:  # a term added to the conv output, e.g. a low-order part
            windows = windows + extra
        windows = windows.reshape(-1, self.filters, POOL * POOL, side, side)
        return self.pool(windows, getattr(self, f"{name}_pool_bias"))

    def pool(self, windows: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaky ReLU and max pool with its backward factor (see :func:`pool_windows`).

        The pre-activations are ``windows + bias`` (bias ``(C, 1, 1)``, per channel).
        """
        return pool_windows(windows, self.slope, bias)

    def conv_moments(
        self, output_gradient: torch.Tensor, columns: torch.Tensor, side: int
    ) -> Moments:
        """Moments of one conv layer's per-sample gradient (weight and bias together).

        ``output_gradient`` ``(B, O, ...)`` in the pixel order of the columns of the
        patches ``columns`` ``(B, C*k*k, HW)``, ``HW = side * side``.
        """
        gradient = output_gradient.reshape(-1, self.filters, side * side)  # (B, O, HW)
        weight = torch.matmul(gradient, columns.transpose(1, 2))  # (B, O, C*k*k)
        bias = gradient.sum(dim=2)  # (B, O)
        return vector_moments(torch.cat([weight.flatten(1), bias], dim=1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Forward pass, keeping what the backward needs. conv1 and conv2 accumulate in
        # float64 so that the max-pool routing (a discontinuity) is decided as the float64
        # reference decides it (module docstring, "Numerics"); their float32 patches
        # serve the weight gradients.
        side1, side2, side3 = IMAGE_SIZE, IMAGE_SIZE // POOL, IMAGE_SIZE // POOL**2
        columns1 = self.patches(images, self.image_patches, 1, side1)  # (B, 9, 784), exact
        pooled1, factor1 = self.pooled_conv(columns1.double(), "conv1", side2)
        # pooled1 (float64) = high + low, both float32; conv2 = float64 matmul on the
        # high part + float32 matmul on the low part (~1e-8 of it): float64 accuracy.
        high = pooled1.float()
        low = (pooled1 - high.double()).float()
        columns2 = self.patches(high, self.pooled1_patches, self.filters, side2)  # (B, 144, 196)
        low_part = F.conv2d(
            low, self.conv2_window_weight, stride=POOL, padding=self.padding
        ).reshape(-1, self.filters, side2 * side2)  # (B, 16, 4 * 49), windows
        pooled2, factor2 = self.pooled_conv(
            columns2.double(), "conv2", side3, low_part.double()
        )  # (B, 16, 7, 7)
        # The channel Mahalanobis score's input, from the float64 activations.
        channels = channel_statistics(pooled1, pooled2).float()  # (B, 64)
        pooled2 = pooled2.float()
        factor1, factor2 = factor1.float(), factor2.float()  # no-ops unless pool() is replaced
        conv3 = F.conv2d(pooled2, self.conv3_weight, self.conv3_bias, padding=self.padding)
        flat = conv3.flatten(1)  # (B, 784)
        logits = F.linear(flat, self.dense_weight, self.dense_bias)  # (B, 10)

        log_probabilities = F.log_softmax(logits, dim=1)  # (B, 10)
        probabilities = log_probabilities.exp()
        entropy = -(probabilities * log_probabilities).sum(dim=1)  # (B,)

        # Loss gradient at the logits, p - onehot(y), divided by s = max_{i != y} p_i.
        predicted = logits.argmax(dim=1, keepdim=True)  # (B, 1), first maximum
        classes = torch.arange(self.num_classes, device=images.device)  # the model's
        is_predicted = classes == predicted  # (B, 10)
        others = log_probabilities.masked_fill(is_predicted, float("-inf"))
        top_other = others.amax(dim=1, keepdim=True)  # (B, 1), log s
        scaled_others = torch.exp(others - top_other)  # (B, 10), 0 at y, max 1
        logit_gradient = torch.where(
            is_predicted, -scaled_others.sum(dim=1, keepdim=True), scaled_others
        )  # (B, 10)
        scale = torch.exp(top_other)  # (B, 1)

        # Dense: weight gradient = outer(logit_gradient, flat), bias gradient = itself.
        dense_parts = Moments.join(
            [outer_product_moments(logit_gradient, flat), vector_moments(logit_gradient)]
        )
        # conv3 (no activation; dropout is the identity in eval mode).
        gradient3 = torch.matmul(logit_gradient, self.dense_weight).reshape(
            -1, self.filters, side3, side3
        )  # (B, 16, 7, 7)
        columns3 = self.patches(pooled2, self.pooled2_patches, self.filters, side3)  # (B, 144, 49)
        layer3 = self.conv_moments(gradient3, columns3, side3)
        gradient_pooled2 = F.conv2d(gradient3, self.conv3_backward, padding=self.padding)
        # conv2: pool + leaky ReLU backward is one factor, in window layout.
        gradient2 = factor2 * gradient_pooled2[:, :, None]  # (B, 16, 4, 7, 7)
        layer2 = self.conv_moments(gradient2, columns2, side2)
        # conv2's input gradient: the window layout is depth-to-space's channel order
        # (o * 4 + p, p = dh * 2 + dw), so the gradient at conv2's output pixels is a copy,
        # and then a "same" conv with the flipped, transposed kernel (as for conv3). Half
        # the multiplications of the transposed windowed conv, most of which hit the
        # zeros that max pooling leaves in three positions of four.
        gradient_conv2 = F.pixel_shuffle(
            gradient2.reshape(-1, self.filters * POOL * POOL, side3, side3), POOL
        )  # (B, 16, 14, 14)
        gradient_pooled1 = F.conv2d(gradient_conv2, self.conv2_backward, padding=self.padding)
        # conv1: its input gradient is not needed.
        gradient1 = factor1 * gradient_pooled1[:, :, None]  # (B, 16, 4, 14, 14)
        layer1 = self.conv_moments(gradient1, columns1, side1)

        # One column per layer, then "all": every part of every layer merged at once.
        layers = Moments.join([layer1, layer2, layer3, combine_moments(dense_parts)])
        everything = combine_moments(Moments.join([layer1, layer2, layer3, dense_parts]))
        metrics = moments_to_metrics(Moments.join([layers, everything]), scale)  # (B, 5, 7)
        # in OUTPUT_NAMES order: (B, 10), (B,), (B, 5, 7), (B, 10), (B, 784), (B, 64)
        return probabilities, entropy, metrics, logits, flat, channels


class EnsembleScorerGraph(nn.Module):
    """All members in one graph: outputs gain a leading member axis ``M``."""

    def __init__(self, models: Sequence[PaperCNN]) -> None:
        super().__init__()
        self.members = nn.ModuleList(MemberScorerGraph(model) for model in models)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [member(images) for member in self.members]
        return tuple(torch.stack(parts, dim=0) for parts in zip(*outputs, strict=True))


def scorer_module(models: PaperCNN | Sequence[PaperCNN]) -> nn.Module:
    """One member's graph for a model, the ensemble graph for a sequence of models."""
    if isinstance(models, PaperCNN):
        return MemberScorerGraph(models).eval()
    models = list(models)
    if not models or not all(isinstance(model, PaperCNN) for model in models):
        raise ValueError(f"models must be a PaperCNN or a non-empty list of them, got {models!r}")
    return EnsembleScorerGraph(models).eval()


def export_onnx(module: nn.Module, path: str | os.PathLike) -> None:
    """Export ``module`` with a dynamic batch axis (legacy TorchScript exporter, opset 17).

    The TorchScript exporter is used because it exports the explicit backward in about a
    second and its graph runs in onnxruntime; it warns that it is deprecated, which is
    silenced here and noted in the report of the issue that chose it.
    """
    example = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    batch_axis = 1 if isinstance(module, EnsembleScorerGraph) else 0
    dynamic_axes = {INPUT_NAME: {0: "batch"}}
    dynamic_axes.update({name: {batch_axis: "batch"} for name in OUTPUT_NAMES})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET_VERSION,
            do_constant_folding=True,
        )


#: Agreement the exported graph must reach with the float64 reference (DESIGN.md 2):
#: |graph - reference| <= absolute + relative * |reference|.
STATISTICS_RELATIVE_TOLERANCE = 1e-3
STATISTICS_ABSOLUTE_TOLERANCE = 1e-5
PROBABILITY_TOLERANCE = 1e-5
#: Logits, penultimate activations, channel statistics: float32 against float64, absolute
#: + relative.
ACTIVATION_TOLERANCE = 1e-4
#: Extra check inputs: seeded uniform-noise images, plus an all-zero and a constant one.
CHECK_NOISE_IMAGES = 16
CHECK_CONSTANT_VALUE = 128
CHECK_SEED = 0


def check_inputs(check_images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> the check batch: them, noise, all-zero and constant images."""
    check_images = np.asarray(check_images)
    if check_images.dtype != np.uint8 or check_images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            "check_images must be uint8 of shape (N, 28, 28), "
            f"got {check_images.dtype} of shape {check_images.shape}"
        )
    rng = np.random.default_rng(CHECK_SEED)
    noise = rng.integers(0, 256, size=(CHECK_NOISE_IMAGES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    zero = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    constant = np.full((1, IMAGE_SIZE, IMAGE_SIZE), CHECK_CONSTANT_VALUE, dtype=np.uint8)
    return np.concatenate([check_images, noise, zero, constant])


def worst_mismatch(
    graph: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, object]:
    """Where graph and reference outputs ``(M, B, ...)`` disagree most, in tolerance units.

    ``ratio`` <= 1 means within tolerance. Names the output, member, image and, for the
    gradient metrics, layer and metric.
    """
    tolerances = {
        "probabilities": (PROBABILITY_TOLERANCE, 0.0),
        "entropy": (PROBABILITY_TOLERANCE, PROBABILITY_TOLERANCE),
        "gradient_metrics": (STATISTICS_ABSOLUTE_TOLERANCE, STATISTICS_RELATIVE_TOLERANCE),
        "logits": (ACTIVATION_TOLERANCE, ACTIVATION_TOLERANCE),
        "penultimate": (ACTIVATION_TOLERANCE, ACTIVATION_TOLERANCE),
        "channel_statistics": (ACTIVATION_TOLERANCE, ACTIVATION_TOLERANCE),
    }
    worst: dict[str, object] = {"ratio": -1.0}
    for name, (absolute, relative) in tolerances.items():
        expected = reference[name].astype(np.float64)
        actual = graph[name].astype(np.float64)
        ratio = np.abs(actual - expected) / (absolute + relative * np.abs(expected))
        ratio = np.where(np.isfinite(actual), ratio, np.inf)  # NaN never agrees
        index = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        if ratio[index] <= worst["ratio"]:
            continue
        worst = {
            "ratio": float(ratio[index]),
            "output": name,
            "member": int(index[0]),
            "image": int(index[1]),
            "graph": float(actual[index]),
            "reference": float(expected[index]),
        }
        if name == "gradient_metrics":
            worst["layer"] = LAYER_NAMES[index[2]]
            worst["metric"] = METRIC_NAMES[index[3]]
        elif name == "probabilities":
            worst["class"] = int(index[2])
    return worst


def reference_outputs(models: Sequence[PaperCNN], images: np.ndarray) -> dict[str, np.ndarray]:
    """float64 reference outputs ``(M, B, ...)`` for uint8 images ``(B, 28, 28)``."""
    network_input = images_to_tensor(images)  # (B, 1, 28, 28)
    scores = [reference_scores(model, network_input, dtype=torch.float64) for model in models]
    outputs = {
        name: np.stack([getattr(score, name).numpy() for score in scores])
        for name in ("probabilities", "entropy", "gradient_metrics")
    }
    with torch.no_grad():
        inputs64 = network_input.double()
        models64 = [copy.deepcopy(model).double().eval() for model in models]
        penultimate = [model.penultimate(inputs64) for model in models64]
        outputs["penultimate"] = np.stack([h.numpy() for h in penultimate])  # (M, B, 784)
        outputs["channel_statistics"] = np.stack(
            [model.channel_statistics(inputs64).numpy() for model in models64]
        )  # (M, B, 64)
        outputs["logits"] = np.stack(
            [model.dense(h).numpy() for h, model in zip(penultimate, models64, strict=True)]
        )  # (M, B, 10)
    return outputs


def export_scorer_graph(
    models: PaperCNN | Sequence[PaperCNN],
    path: str | os.PathLike,
    check_images: np.ndarray,
    *,
    module: nn.Module | None = None,
) -> dict[str, object]:
    """Export a scorer graph, check it in onnxruntime against the reference, then write it.

    Parameters
    ----------
    models : PaperCNN or sequence of PaperCNN
        One member (a member graph) or several (one ensemble graph, member axis first).
    path : path
        Destination; written only after the check passes (temp file, then rename).
    check_images : ndarray of shape (N, 28, 28), uint8
        Real images to check on; seeded uniform noise, an all-zero and a constant image
        are added.
    module : nn.Module, optional
        The module to export instead of :func:`scorer_module` ``(models)``; it is held
        against the reference of ``models`` all the same (tests pass a broken one).

    Returns
    -------
    dict
        ``path``, ``members``, ``check_images`` (how many), ``worst`` (the worst
        agreement, see :func:`worst_mismatch`) and ``provider``.

    Raises
    ------
    ScorerExportError
        The graph disagrees beyond tolerance; the message names the worst mismatch.
    """
    members = [models] if isinstance(models, PaperCNN) else list(models)
    module = scorer_module(models) if module is None else module.eval()
    images = check_inputs(check_images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        export_onnx(module, temporary)
        engine = ScorerEngine([temporary], providers=["CPUExecutionProvider"])
        output = engine.run(images)
        graph = {name: getattr(output, name) for name in OUTPUT_NAMES}
        if output.num_members != len(members):
            raise ScorerExportError(
                f"the graph has {output.num_members} members, expected {len(members)}"
            )
        worst = worst_mismatch(graph, reference_outputs(members, images))
        if worst["ratio"] > 1.0:
            raise ScorerExportError(
                f"scorer graph disagrees with the reference; {path} not written. Worst "
                f"mismatch: {worst} (ratio = error / tolerance; tolerances: statistics "
                f"{STATISTICS_RELATIVE_TOLERANCE} relative + {STATISTICS_ABSOLUTE_TOLERANCE} "
                f"absolute, probabilities {PROBABILITY_TOLERANCE})"
            )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return {
        "path": str(path),
        "members": len(members),
        "check_images": len(images),
        "worst": worst,
        "provider": engine.providers_in_use[0],
    }
