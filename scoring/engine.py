"""Runs the exported scorer graphs with onnxruntime; no torch (DESIGN.md section 2).

The service and the training pipeline both compute features through this engine, so
the meta classifiers are fitted on exactly the numbers they later score.

A scorer graph (``training/scorer_graph.py``) has one input ``images`` float32
``(B, 1, 28, 28)`` in [0, 1] and the outputs ``probabilities``, ``entropy``,
``gradient_metrics``, ``logits``, ``penultimate`` (the dense layer's input) and
``channel_statistics`` (each channel's mean and standard deviation over the pixels of
the pooled conv1 and conv2 activations): ``(B, 10)``, ``(B,)``, ``(B, 5, 7)``,
``(B, 10)``, ``(B, 784)``, ``(B, 64)`` for one member, or with a
leading member axis ``(M, ...)`` for a graph that holds the whole ensemble. The engine
stacks all graphs' members in the order given. 10 is the digits' class count; a bundle
built from a user's data set has its own, which the engine takes from the graphs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from scoring.features import IMAGE_SIZE, LAYER_NAMES, METRIC_NAMES

__all__ = [
    "DEFAULT_PROVIDERS",
    "DEVICE_PROVIDERS",
    "SINGLE_THREAD_MAX_BATCH",
    "EngineOutput",
    "ScorerEngine",
    "default_threads",
    "to_network_input",
    "validate_images",
]

logger = logging.getLogger(__name__)

#: Preferred execution providers, best first; only the available ones are requested.
DEFAULT_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: Providers that run on a device of their own, with onnxruntime's name for the device:
#: the engine binds the input there once per batch (I/O binding).
DEVICE_PROVIDERS: dict[str, str] = {"CUDAExecutionProvider": "cuda"}
#: Intra-op threads per session unless told otherwise: more than 4 buys little for
#: these small graphs and starves the other sessions and the web server.
MAX_DEFAULT_THREADS = 4
#: Batches of at most this many images (or of fewer images than the sessions' threads)
#: run on one-thread copies of the CPU sessions. Two reasons, both measured on the
#: default bundle: an image's gradient metrics came out of a session with T threads
#: different in the last bits (up to 8e-6) when its batch held fewer than T images
#: (onnxruntime then splits a reduction instead of the batch), so an answer would depend
#: on how many requests it was batched with; and up to 8 images one thread is faster than
#: two (the whole scorer on 2 cores, batch 1: 7.0 against 7.6 ms, batch 8: 23.0 against
#: 24.2 ms; from 16 images on two are faster, 0.77x the time at 256).
SINGLE_THREAD_MAX_BATCH = 8
#: Batch size of :meth:`ScorerEngine.run_batched` unless told otherwise.
DEFAULT_BATCH_SIZE = 512
INPUT_NAME = "images"
OUTPUT_NAMES: tuple[str, ...] = (
    "probabilities",
    "entropy",
    "gradient_metrics",
    "logits",
    "penultimate",
    "channel_statistics",
)
#: Rank of each output in a one-member graph; an ensemble graph adds a member axis.
MEMBER_OUTPUT_RANKS: dict[str, int] = {
    "probabilities": 2,
    "entropy": 1,
    "gradient_metrics": 3,
    "logits": 2,
    "penultimate": 2,
    "channel_statistics": 2,
}
#: Several sessions on few cores fight each other when idle threads spin.
SPINNING_OFF: dict[str, str] = {
    "session.intra_op.allow_spinning": "0",
    "session.inter_op.allow_spinning": "0",
}


@dataclass(frozen=True)
class EngineOutput:
    """Scores of ``M`` members for ``B`` images (all float32)."""

    probabilities: np.ndarray  # (M, B, 10)
    entropy: np.ndarray  # (M, B)
    softmax_baseline: np.ndarray  # (M, B)
    gradient_metrics: np.ndarray  # (M, B, len(LAYER_NAMES), len(METRIC_NAMES))
    logits: np.ndarray  # (M, B, 10)
    penultimate: np.ndarray  # (M, B, 784), the dense layer's input
    channel_statistics: np.ndarray  # (M, B, 64), pooled conv1 and conv2 channel mean, std

    @property
    def num_members(self) -> int:
        return self.probabilities.shape[0]

    def features(self) -> np.ndarray:
        """Feature vectors ``(M, B, 37)`` in :func:`scoring.features.feature_names` order."""
        members, batch = self.entropy.shape
        gradient = self.gradient_metrics.reshape(members, batch, -1)  # layer-major
        return np.concatenate(
            [self.entropy[..., None], self.softmax_baseline[..., None], gradient], axis=2
        )

    @staticmethod
    def concatenate(parts: Sequence[EngineOutput]) -> EngineOutput:
        """Outputs of consecutive batches joined along the image axis."""
        return EngineOutput(
            *(np.concatenate([getattr(part, name) for part in parts], axis=1) for name in _FIELDS)
        )


_FIELDS = (
    "probabilities",
    "entropy",
    "softmax_baseline",
    "gradient_metrics",
    "logits",
    "penultimate",
    "channel_statistics",
)


def validate_images(images: np.ndarray) -> np.ndarray:
    """``images`` as an array if uint8 ``(B, 28, 28)`` or float32 ``(B, 1, 28, 28)``.

    Raises ``ValueError`` naming the dtype and shape received for anything else.
    """
    images = np.asarray(images)
    side = (IMAGE_SIZE, IMAGE_SIZE)
    is_uint8 = images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == side
    is_float = images.dtype == np.float32 and images.ndim == 4 and images.shape[1:] == (1, *side)
    if not (is_uint8 or is_float):
        raise ValueError(
            "images must be uint8 of shape (B, 28, 28) or float32 of shape (B, 1, 28, 28), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"images must hold at least one image, got shape {images.shape}")
    return images


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(B, 28, 28)`` / 255 or float32 ``(B, 1, 28, 28)`` -> float32 ``(B, 1, 28, 28)``."""
    images = validate_images(images)
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / np.float32(255.0))[:, None]
    return np.ascontiguousarray(images)


def default_threads() -> int:
    """An engine's intra-op threads unless told: the cores, at most MAX_DEFAULT_THREADS."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_THREADS)


class ScorerEngine:
    """onnxruntime sessions for scorer graphs, one per file, members stacked in order.

    Parameters
    ----------
    graph_paths : sequence of path
        Scorer graph files: one member each, or a whole ensemble in one file.
    providers : sequence of str, optional
        Execution providers in order of preference; default CUDA, then CPU. Providers
        that this onnxruntime build lacks are skipped (CPU is always the last resort);
        :attr:`providers_in_use` says what each session really got, and
        :attr:`unavailable_providers` which requested ones no session got.
    threads : int, optional
        Intra-op threads per session; default ``min(cpu count, 4)``. Inter-op
        parallelism is off and idle threads do not spin, so that several sessions and
        the web server share few cores. With more than one thread, each CPU session
        gets a one-thread copy for small batches (:data:`SINGLE_THREAD_MAX_BATCH`), so
        an image's answer does not depend on the size of the batch it came in.
    io_binding : bool, optional
        Run the sessions through onnxruntime's I/O binding: the batch is copied to each
        device once and bound to every session there (five member graphs on one GPU
        share one upload), and the outputs are bound to host memory. Default: on for
        sessions on a device provider (CUDA), off on the CPU, where binding adds about
        0.07 ms a call (14% at batch 1) and saves no copy.
    """

    def __init__(
        self,
        graph_paths: Sequence[Path | str],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
    ) -> None:
        if isinstance(graph_paths, str | Path) or not graph_paths:
            raise ValueError(
                f"graph_paths must be a non-empty sequence of paths, got {graph_paths!r}"
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.graph_paths = [Path(path) for path in graph_paths]
        for path in self.graph_paths:
            if not path.is_file():
                raise FileNotFoundError(f"scorer graph not found: {path}")
        self.threads = threads or default_threads()
        self.requested_providers = list(providers or DEFAULT_PROVIDERS)
        available = set(ort.get_available_providers())
        chosen = [name for name in self.requested_providers if name in available]
        missing = [name for name in self.requested_providers if name not in available]
        if missing and providers is not None:  # the defaults may well be absent
            logger.warning(
                "execution providers %s are not available in this onnxruntime build "
                "(available: %s); falling back to the next one",
                missing,
                sorted(available),
            )
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        options = self._session_options()
        self.sessions = [self._open_session(path, options, chosen) for path in self.graph_paths]
        #: The provider each session really runs on (its first), one per graph file.
        self.providers_in_use: list[str] = [s.get_providers()[0] for s in self.sessions]
        in_use = {name for session in self.sessions for name in session.get_providers()}
        #: Requested providers that no session got: absent from this build, or present but
        #: unable to start (no GPU, no driver); every graph then runs on the next one.
        self.unavailable_providers: list[str] = [
            name for name in self.requested_providers if name not in in_use
        ]
        failed = [name for name in self.unavailable_providers if name in available]
        if failed and providers is not None:
            logger.warning(
                "execution providers %s are in this onnxruntime build but could not start; "
                "the scorer graphs run on %s",
                failed,
                sorted(set(self.providers_in_use)),
            )
        #: The sessions small batches run on: one-thread copies of the CPU sessions
        #: (the same sessions where there is one thread, or on a device provider).
        self.small_batch_sessions = self._single_thread_copies()
        self._members_per_graph = [self._members_of(s) for s in self.sessions]
        #: Where each session's input is bound ((device, id), as onnxruntime names them),
        #: or None for a session run without I/O binding.
        self.bound_devices: list[tuple[str, int] | None] = [
            self._bound_device(session, io_binding) for session in self.sessions
        ]

    @staticmethod
    def _open_session(
        path: Path, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        """A session on the first of ``providers`` that starts; CPU as the last resort.

        onnxruntime skips a provider whose library fails to load, but a provider that
        loads and then fails to initialise (a CUDA build on a machine without a usable
        GPU) can raise instead; the graph then runs on the CPU rather than not at all.
        """
        try:
            return ort.InferenceSession(str(path), options, providers=providers)
        except (RuntimeError, ValueError) as error:
            if providers == ["CPUExecutionProvider"]:
                raise
            logger.warning(
                "%s: creating a session with providers %s failed (%s); using CPUExecutionProvider",
                path,
                providers,
                error,
            )
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _single_thread_copies(self) -> list[ort.InferenceSession]:
        """One-thread copies of the CPU sessions; the sessions themselves where they have
        one thread already or run on a device (the CPU provider's thread pool is what split
        the reductions; a device provider's kernels do not use it)."""
        if self.threads == 1:
            return list(self.sessions)
        options = self._session_options(threads=1)
        return [
            self._open_session(path, options, ["CPUExecutionProvider"])
            if session.get_providers()[0] == "CPUExecutionProvider"
            else session
            for path, session in zip(self.graph_paths, self.sessions, strict=True)
        ]

    def sessions_for(self, batch_size: int) -> list[ort.InferenceSession]:
        """The sessions a batch of ``batch_size`` images runs on (see the threads parameter)."""
        if batch_size <= max(SINGLE_THREAD_MAX_BATCH, self.threads - 1):
            return self.small_batch_sessions
        return self.sessions

    def _session_options(self, threads: int | None = None) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in SPINNING_OFF.items():
            options.add_session_config_entry(key, value)
        return options

    @staticmethod
    def _bound_device(
        session: ort.InferenceSession, io_binding: bool | None
    ) -> tuple[str, int] | None:
        """The device a session's input is bound on, None for a plain ``session.run``."""
        provider = session.get_providers()[0]
        if io_binding is None:
            io_binding = provider in DEVICE_PROVIDERS
        if not io_binding:
            return None
        if provider not in DEVICE_PROVIDERS:
            return ("cpu", 0)
        options = session.get_provider_options().get(provider, {})
        return (DEVICE_PROVIDERS[provider], int(options.get("device_id", 0)))

    @staticmethod
    def _members_of(session: ort.InferenceSession) -> int:
        """1 for a member graph, M for an ensemble graph (outputs with a member axis)."""
        inputs = session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise ValueError(f"scorer graph must have one input {INPUT_NAME!r}, got {inputs}")
        outputs = {o.name: o.shape for o in session.get_outputs()}
        missing = [name for name in OUTPUT_NAMES if name not in outputs]
        if missing:
            raise ValueError(f"scorer graph lacks outputs {missing}; it has {sorted(outputs)}")
        shape = outputs["probabilities"]
        if len(shape) == 2:
            return 1
        if len(shape) == 3 and isinstance(shape[0], int):
            return shape[0]
        raise ValueError(f"scorer graph 'probabilities' has an unexpected shape {shape}")

    @property
    def num_members(self) -> int:
        return sum(self._members_per_graph)

    def run(self, images: np.ndarray) -> EngineOutput:
        """Scores of every member for one batch: uint8 (B, 28, 28) or float32 (B, 1, 28, 28)."""
        network_input = to_network_input(images)  # (B, 1, 28, 28) float32
        parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
        uploads: dict[tuple[str, int], ort.OrtValue] = {}  # one copy of the batch a device
        sessions = self.sessions_for(len(network_input))
        for session, device in zip(sessions, self.bound_devices, strict=True):
            if device is None:
                results = session.run(list(OUTPUT_NAMES), {INPUT_NAME: network_input})
            else:
                if device not in uploads:
                    uploads[device] = ort.OrtValue.ortvalue_from_numpy(network_input, *device)
                results = self._run_bound(session, uploads[device])
            for name, value in zip(OUTPUT_NAMES, results, strict=True):
                one_member = value.ndim == MEMBER_OUTPUT_RANKS[name]
                parts[name].append(value[None] if one_member else value)  # (M, B, ...)
        probabilities = np.concatenate(parts["probabilities"], axis=0)  # (M, B, 10)
        gradient_metrics = np.concatenate(parts["gradient_metrics"], axis=0)  # (M, B, L, S)
        expected = (len(LAYER_NAMES), len(METRIC_NAMES))
        # The class count is the graphs' own (10 for digits; a user's data set has its own).
        if probabilities.shape[2] < 2 or gradient_metrics.shape[2:] != expected:
            raise ValueError(
                f"scorer graph outputs have shapes {probabilities.shape} and "
                f"{gradient_metrics.shape}, expected (M, B, classes >= 2) and (M, B, *{expected})"
            )
        return EngineOutput(
            probabilities=probabilities,
            entropy=np.concatenate(parts["entropy"], axis=0),
            softmax_baseline=probabilities.max(axis=2),
            gradient_metrics=gradient_metrics,
            logits=np.concatenate(parts["logits"], axis=0),
            penultimate=np.concatenate(parts["penultimate"], axis=0),
            channel_statistics=np.concatenate(parts["channel_statistics"], axis=0),
        )

    @staticmethod
    def _run_bound(session: ort.InferenceSession, images: ort.OrtValue) -> list[np.ndarray]:
        """One session through I/O binding: ``images`` already on its device, outputs to host."""
        binding = session.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, images)
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_batched(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> EngineOutput:
        """:meth:`run` over consecutive slices of at most ``batch_size`` images."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        images = validate_images(images)  # fail before the first batch, not in the middle
        parts = [
            self.run(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
        return parts[0] if len(parts) == 1 else EngineOutput.concatenate(parts)
