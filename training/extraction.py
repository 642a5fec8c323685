"""The build's engine passes over many image sets, in the driver or as parallel Ray tasks.

A bundle build runs the scorer graphs over a few dozen image sets: every member's
training images (feature-space statistics), validation and test splits and every concept
(paper level), and the calibration, test and concept sets again at ensemble level
(service level). An :class:`Extractor` runs such a pass: :class:`LocalExtractor` in the
driver, set after set (the default); :class:`RayExtractor` as Ray tasks over chunks of
whole batches, on as many CPUs as the cluster lends. Both call the same job function on
the same batches (a chunk is a multiple of the batch size), so their answers are
bit-identical and a build on Ray writes the same bundle as a local one.

The graphs travel as bytes (:class:`GraphFiles`), so workers need no file system shared
with the driver; a worker opens each engine once and keeps it for later tasks. Thread
counts are fixed wherever a job runs: the engine's intra-op threads travel with the
graphs, and numpy's BLAS runs :data:`BLAS_THREADS` threads (Ray gives a task as many as
it has CPUs, the driver all its cores, and a float64 product such as the Mahalanobis
distance differs in its last bits between thread counts).
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from scoring.engine import ScorerEngine

__all__ = [
    "DEFAULT_CHUNK_BATCHES",
    "Extractor",
    "GraphFiles",
    "LocalExtractor",
    "RayExtractor",
    "join_member_outputs",
    "join_rows",
    "member_outputs",
    "member_feature_inputs",
]

#: Batches per Ray task: large enough that a task's start-up (an engine per worker, once)
#: is small beside its work, small enough that a large set spreads over the cluster.
DEFAULT_CHUNK_BATCHES = 4
#: numpy BLAS threads of a job, in the driver and in Ray tasks alike.
BLAS_THREADS = 1

#: A job: ``function(engine, images, batch_size, **options)`` -> one result per set.
Job = Callable[..., Any]
#: How the results of consecutive chunks of one set become the set's result.
Join = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class GraphFiles:
    """Scorer graphs as bytes, with the engine thread count: what an engine is made of."""

    names: tuple[str, ...]
    contents: tuple[bytes, ...]
    threads: int

    @classmethod
    def read(cls, paths: Sequence[Path], threads: int) -> GraphFiles:
        paths = [Path(path) for path in paths]
        return cls(tuple(p.name for p in paths), tuple(p.read_bytes() for p in paths), threads)

    @cached_property
    def digest(self) -> str:
        hasher = hashlib.sha256(str(self.threads).encode())
        for name, content in zip(self.names, self.contents, strict=True):
            hasher.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
        return hasher.hexdigest()

    def engine(self, engines: dict[str, ScorerEngine] | None = None) -> ScorerEngine:
        """An engine for these graphs, opened on first use and kept in ``engines`` (by
        default this process's: a Ray worker's lives as long as the worker)."""
        engines = _WORKER_ENGINES if engines is None else engines
        if self.digest not in engines:
            # onnxruntime reads the files when the session is made; they can go then.
            with tempfile.TemporaryDirectory(prefix="gradunc-graphs-") as folder:
                paths = [Path(folder) / name for name in self.names]
                for path, content in zip(paths, self.contents, strict=True):
                    path.write_bytes(content)
                engines[self.digest] = ScorerEngine(
                    paths, providers=["CPUExecutionProvider"], threads=self.threads
                )
        return engines[self.digest]


#: Engines opened by a Ray worker process, by GraphFiles digest, for its later tasks.
_WORKER_ENGINES: dict[str, ScorerEngine] = {}


def member_outputs(
    engine: ScorerEngine, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every member's probabilities ``(M, N, 10)`` and paper-level features ``(M, N, 37)``."""
    output = engine.run_batched(images, batch_size)
    return np.asarray(output.probabilities), np.asarray(output.features())


def join_rows(parts: list[tuple[np.ndarray, ...]], axis: int = 0) -> tuple[np.ndarray, ...]:
    """Consecutive chunks' outputs, each a tuple of arrays, joined along the image axis."""
    columns = zip(*parts, strict=True)  # the i-th arrays of every chunk
    return tuple(np.concatenate(arrays, axis=axis) for arrays in columns)


#: :func:`member_outputs` has the members first: images are axis 1.
join_member_outputs = functools.partial(join_rows, axis=1)


def member_feature_inputs(
    engine: ScorerEngine, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one member's feature-space statistics are fitted on: its penultimate features
    ``(N, D)``, logits ``(N, 10)`` and channel statistics ``(N, S)``."""
    output = engine.run_batched(images, batch_size)
    return output.penultimate[0], output.logits[0], output.channel_statistics[0]


class Extractor(Protocol):
    """Runs one job over named image sets, each with its graphs; results by set name."""

    def map(
        self,
        job: Job,
        join: Join,
        sets: Mapping[str, tuple[GraphFiles, np.ndarray]],
        batch_size: int,
        **options: Any,
    ) -> dict[str, Any]: ...


def _run(
    job: Job,
    graphs: GraphFiles,
    images: np.ndarray,
    batch_size: int,
    options: dict,
    engines: dict[str, ScorerEngine] | None = None,
):
    """The job on some whole batches, with an engine from ``engines`` (see
    :meth:`GraphFiles.engine`) and fixed BLAS threads."""
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        return job(graphs.engine(engines), images, batch_size, **options)


class LocalExtractor:
    """In the driver, set after set: the default, and what a build on Ray must equal.

    Its engines last one :meth:`map` call: a driver runs many builds' passes (a test
    session, a notebook), and an engine holds its memory arena for its batch size.
    """

    def map(self, job, join, sets, batch_size, **options):
        engines: dict[str, ScorerEngine] = {}
        return {
            name: join([_run(job, graphs, images, batch_size, options, engines)])
            for name, (graphs, images) in sets.items()
        }


class RayExtractor:
    """Ray tasks over chunks of ``chunk_batches`` whole batches; Ray must be initialized
    (:func:`training.ray_training.ray_session`). ``cpus`` is what a task asks for."""

    def __init__(
        self,
        cpus: float = 1.0,
        chunk_batches: int = DEFAULT_CHUNK_BATCHES,
        log: Callable[[str], None] = print,
    ) -> None:
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be at least 1, got {chunk_batches}")
        self.cpus, self.chunk_batches, self.log = cpus, chunk_batches, log

    def map(self, job, join, sets, batch_size, **options):
        import ray

        task = ray.remote(num_cpus=self.cpus)(_run)
        options_ref = ray.put(options)  # once, however many tasks (statistics are large)
        graph_refs: dict[str, Any] = {}
        pending: dict[str, list] = {}
        chunk = self.chunk_batches * batch_size
        for name, (graphs, images) in sets.items():
            if graphs.digest not in graph_refs:
                graph_refs[graphs.digest] = ray.put(graphs)
            pending[name] = [
                task.remote(
                    job,
                    graph_refs[graphs.digest],
                    images[start : start + chunk],
                    batch_size,
                    options_ref,
                )
                for start in range(0, max(len(images), 1), chunk)
            ]
        tasks = sum(len(refs) for refs in pending.values())
        self.log(f"{job.__name__} of {len(sets)} image sets as {tasks} Ray tasks")
        return {name: join(ray.get(refs)) for name, refs in pending.items()}
