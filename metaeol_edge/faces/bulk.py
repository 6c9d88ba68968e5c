"""Corpus-scale embedding: a resumable job on every core of one machine, or on a Ray cluster.

A job cuts its input into shards of ``shard_size`` rows. Workers (this process,
N engine processes, or Ray actors) embed the shards, and this process writes
each finished shard to ``OUT.shards/NNNNNNNN.npy`` (atomically) as it arrives.
Only when every shard is there is the output assembled from them, in input
order, under a temporary name, then renamed into place, and the shards removed.
A job killed at any point (``kill -9``, power loss) and started again with the
same command finds its finished shards and computes only the others, with the
cache on or off. What decides the vectors (the input file, the model file, every
option that changes a vector; not the batch size, the threads or the cache) is
written to ``OUT.shards/job.json`` first: a rerun with any of it changed starts
over instead of mixing vectors of two settings. A job holds a lock beside its
output, so a second job of the same output is refused while the first runs.

The engine's vectors depend neither on what is batched with them nor on the
number of threads (``tests/test_bulk.py`` checks it), so any split of the work
gives the bytes of one process.

Ray: :func:`embed_dataset` adds an ``embedding`` column to a Ray Dataset through
``map_batches`` with an actor class, so each actor loads the model once; ``metaeol
embed --ray`` runs the resumable job above with Ray actors as its workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metaeol_edge.core.config import EmbedConfig, decisive_options
from metaeol_edge.errors import InputError
from metaeol_edge.faces.corpus import Record, VectorWriter, check_output, count_sentences, id_arrow_type, iter_records

JOB_VERSION = 1
DEFAULT_SHARD_SIZE = 32  # rows: what a kill can lose per worker, and what the last worker may run alone
IN_FLIGHT_PER_WORKER = 2  # shards queued per worker, so none waits for the reader


@dataclass(frozen=True)
class EncodeOptions:
    """How each shard is encoded (what ``MetaEOL.encode`` is given)."""

    batch_size: int = 32
    normalize_embeddings: bool = False
    per_template: bool = False


@dataclass
class ShardResult:
    """One shard's vectors (layers, rows, *shape), what the cache did, and the worker that made them."""

    vectors: np.ndarray
    hits: int = 0
    misses: int = 0
    worker: str = ""
    peak_rss_mb: float = 0.0
    warnings: list[str] = field(default_factory=list)  # the worker's warnings, passed on to the job's caller


@dataclass
class BulkReport:
    """What a job did: rows, how many were already done (resumed), cache use, time, each worker's peak RSS."""

    output: Path
    rows: int
    resumed_rows: int = 0
    shards: int = 0
    hits: int = 0
    misses: int = 0
    seconds: float = 0.0
    shape: tuple[int, ...] = ()
    workers: dict[str, float] = field(default_factory=dict)  # worker -> peak RSS in MB

    @property
    def rows_per_s(self) -> float:
        computed = self.rows - self.resumed_rows
        return computed / self.seconds if self.seconds > 0 else float("nan")


# -- what every kind of worker runs --------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MB (MiB, as the benchmarks report it).

    VmHWM where there is /proc: Linux carries ``ru_maxrss`` over from the parent
    across fork and exec, so a spawned worker would report its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def embed_shard(
    model: Any,
    texts: list[str],
    encode: EncodeOptions,
    on_rows: Callable[[int], None] | None = None,
    start: int = 0,
) -> ShardResult:
    """Embed one shard (input rows ``start``...) with a ``MetaEOL``: vectors as (layers, rows, *shape) float32.

    Warnings are collected and returned rather than printed: a worker process's
    would otherwise reach the terminal out of order, or not reach the caller.
    """
    from metaeol_edge.core.embedder import EncodeStats

    stats = EncodeStats()
    parts: list[list[np.ndarray]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in model.encode_batches(
            texts,
            batch_size=encode.batch_size,
            normalize_embeddings=encode.normalize_embeddings,
            show_progress_bar=False,
            per_template=encode.per_template,
            stats=stats,
            start=start,
        ):
            per_layer = batch if isinstance(batch, list) else [batch]
            parts.append(per_layer)
            if on_rows is not None:
                on_rows(len(per_layer[0]))
    vectors = np.stack([np.concatenate([p[li] for p in parts]) for li in range(len(parts[0]))])
    worker = f"{_host()}:{os.getpid()}"
    return ShardResult(vectors, stats.hits, stats.misses, worker, peak_rss_mb(), [str(w.message) for w in caught])


def _host() -> str:
    import socket

    return socket.gethostname()


class ShardEmbedder:
    """A worker's model, loaded once: a process of the local pool, or a Ray actor."""

    def __init__(self, config: EmbedConfig, encode: EncodeOptions) -> None:
        from metaeol_edge.core.embedder import MetaEOL

        self.model = MetaEOL.from_config(config)
        self.encode = encode

    def embed(self, index: int, start: int, texts: list[str]) -> tuple[int, ShardResult]:
        return index, embed_shard(self.model, texts, self.encode, start=start)

    def close(self) -> None:
        self.model.close()


# -- executors: where shards are embedded --------------------------------------------

Shards = Iterable[tuple[int, int, list[str]]]
"""(shard index, index of its first row in the input, its texts)"""
OnRows = Callable[[int], None]
"""Told of every row once, as it is embedded (within a shard where the worker can say so)."""


class InProcess:
    """Shards embedded by one model in this process (``--workers 1``)."""

    name = "1 process"

    def __init__(self, model: Any, encode: EncodeOptions) -> None:
        self.model, self.encode = model, encode

    def run(self, shards: Shards, on_rows: OnRows) -> Iterator[tuple[int, ShardResult]]:
        for index, start, texts in shards:
            yield index, embed_shard(self.model, texts, self.encode, on_rows, start)

    def close(self) -> None:
        pass  # the model is the caller's

    kill = close


def _worker_main(
    config: EmbedConfig, encode: EncodeOptions, tasks: Any, results: Any, parent: int
) -> None:  # pragma: no cover - runs in the worker processes
    """A local worker: load the model once, embed shards until told to stop or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    _exit_with_parent(parent)
    warnings.simplefilter("always", UserWarning)
    warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
    try:
        worker = ShardEmbedder(config, encode)
    except BaseException as exc:
        results.put(("error", _picklable(exc)))
        return
    while True:
        item = tasks.get()
        if item is None:
            break
        index, start, texts = item
        try:
            result = embed_shard(worker.model, texts, encode, lambda n: results.put(("rows", n)), start)
            results.put(("shard", (index, result)))
        except BaseException as exc:
            results.put(("error", _picklable(exc)))
            break
    worker.close()


def _exit_with_parent(parent: int) -> None:  # pragma: no cover - runs in the worker processes
    """A worker whose parent died (``kill -9``) exits too, instead of computing for no one."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class ProcessPool:
    """Shards embedded by N engine processes (spawned: no fork of a loaded model), each with its threads."""

    def __init__(self, config: EmbedConfig, encode: EncodeOptions, workers: int, threads: int) -> None:
        self.name = f"{workers} processes x {threads} thread{'s' if threads > 1 else ''}"
        ctx = mp.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        config = config.replace(n_threads=threads)
        self.procs = [
            ctx.Process(target=_worker_main, args=(config, encode, self.tasks, self.results, os.getpid()), daemon=True)
            for _ in range(workers)
        ]
        for p in self.procs:
            p.start()

    def run(self, shards: Shards, on_rows: OnRows) -> Iterator[tuple[int, ShardResult]]:
        limit = IN_FLIGHT_PER_WORKER * len(self.procs)
        pending = 0
        it = iter(shards)
        exhausted = False
        while True:
            while not exhausted and pending < limit:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                self.tasks.put(item)
                pending += 1
            if pending == 0:
                return
            kind, value = self._next()
            if kind == "error":
                raise value
            if kind == "rows":
                on_rows(value)
            else:
                pending -= 1
                yield value

    def _next(self) -> tuple[str, Any]:
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:  # killed (out of memory, say) without a word
                    raise RuntimeError(f"a worker process died (exit code {dead[0].exitcode})") from None

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                self.tasks.put(None)
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join()


def ray_init(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to Ray: ``local`` starts a cluster in this process, ``auto`` or ADDRESS joins a running one."""
    ray = _import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="warning", log_to_driver=True)
        try:
            if address in (None, "local"):
                ray.init(num_cpus=num_cpus, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = "a local Ray" if address in (None, "local") else f"Ray at {address}"
            raise InputError(f"cannot start or reach {where}: {exc}") from exc
    return ray


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError('Ray is not installed: pip install "metaeol-edge[ray]"') from exc
    return ray


class RayPool:
    """Shards embedded by Ray actors, each with its own model, threads and (its node's) cache."""

    def __init__(
        self, config: EmbedConfig, encode: EncodeOptions, actors: int, num_cpus: int, address: str | None
    ) -> None:
        ray = ray_init(address)
        from ray.util import ActorPool

        self.name = f"Ray, {actors} actors x {num_cpus} CPU{'s' if num_cpus > 1 else ''}"
        actor = ray.remote(num_cpus=num_cpus)(ShardEmbedder)
        config = config.replace(n_threads=num_cpus)
        self.ray = ray
        self.actors = [actor.remote(config, encode) for _ in range(actors)]
        self.pool = ActorPool(self.actors)

    def run(self, shards: Shards, on_rows: OnRows) -> Iterator[tuple[int, ShardResult]]:
        limit = IN_FLIGHT_PER_WORKER * len(self.actors)
        pending = 0
        for item in shards:
            self.pool.submit(lambda a, v: a.embed.remote(*v), item)
            pending += 1
            if pending >= limit:
                yield self._next(on_rows)
                pending -= 1
        for _ in range(pending):
            yield self._next(on_rows)

    def _next(self, on_rows: OnRows) -> tuple[int, ShardResult]:
        try:
            index, result = self.pool.get_next_unordered()
            on_rows(result.vectors.shape[1])  # an actor's progress arrives with its shard
            return index, result
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        except self.ray.exceptions.ActorDiedError as exc:
            raise RuntimeError(f"a Ray actor died: {exc}") from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)

    kill = close


# -- the job ------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_workers(model_bytes: int, cores: int | None = None) -> int:
    """``--workers auto``: one single-thread process per core for small models, else one process.

    Measured by benchmarks/bulk.py on 2 cores (README, "Speed and memory"): two
    one-thread processes gave 1.05x one two-thread process on smollm2-135m and
    1.12x on gemma3-270m. Bigger models are not measured; they keep one process
    because each worker holds its own copy of the weights.
    """
    cores = cores or usable_cores()
    return max(1, cores) if model_bytes <= SMALL_MODEL_BYTES else 1


SMALL_MODEL_BYTES = 400_000_000


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"{index:08d}.npy"


@dataclass(frozen=True)
class Source:
    """A job's input: the file, its format and the columns read (what every pass over it needs)."""

    path: Path
    fmt: str | None = None
    text_column: str = "text"
    id_column: str | None = None

    def records(self) -> Iterator[Record]:
        return iter_records(self.path, self.fmt, self.text_column, self.id_column)

    def shards(self, size: int) -> Iterator[list[Record]]:
        from metaeol_edge.core.embedder import batched

        return batched(self.records(), size)  # type: ignore[return-value]


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def job_identity(
    source: Source,
    rows: int,
    shard_size: int,
    model: Any,
    config: EmbedConfig,
    encode: EncodeOptions,
) -> dict[str, Any]:
    """Everything that decides a job's vectors and rows (not how fast or where they are made)."""
    units = hashlib.sha256("\x00".join(u.key for u in model.units).encode("utf-8")).hexdigest()
    return _decisive(
        {
            "version": JOB_VERSION,
            "input": _file_identity(source.path)
            | {"format": source.fmt, "text_column": source.text_column, "id_column": source.id_column},
            "rows": rows,
            "shard_size": shard_size,
            "model": _file_identity(model.model_path) | {"label": model.model_label},
            "prompts": units,
            "method": model.method.name,
            "layers": list(model.layers),
            "options": config.identity(),
            "encode": asdict(encode),
        }
        # `quality@2`, where `options` holds `quality`: a later revision of the preset is another job. Only
        # where a preset is named, so a job without one keeps the identity it had.
        | ({"preset": model.preset.pinned} if getattr(model, "preset", None) is not None else {})
    )


def _decisive(identity: dict[str, Any]) -> dict[str, Any]:
    """A job identity less what does not decide a vector: the batch size (vectors do not depend on
    what is batched with them), whether a cache is used and where, and the settings that only change
    speed (:func:`metaeol_edge.core.config.decisive_options`). The cache's dtype stays where a cache is
    on: a float16 cache hands out float16-rounded vectors.

    Applied to a stored job.json too, so a job made by 0.2 (whose identity held these, and only the
    options its CLI passed) continues."""
    identity = json.loads(json.dumps(identity))  # a copy; the stored one is plain JSON already
    encode = identity.get("encode")
    if isinstance(encode, dict):
        encode.pop("batch_size", None)
    options = identity.get("options")
    if isinstance(options, dict):
        identity["options"] = decisive_options(options)
    return identity


def _prepare(folder: Path, identity: dict[str, Any]) -> set[int]:
    """Open the job's folder: the indices of shards already finished (none if the job changed)."""
    stamp = folder / "job.json"
    if folder.exists() and not stamp.is_file():  # never delete a folder this module did not make
        raise InputError(f"{folder} exists and is not an unfinished job's folder: move it away, or name another output")
    if folder.is_dir():
        try:
            same = _decisive(json.loads(stamp.read_text(encoding="utf-8"))) == identity
        except (OSError, ValueError, TypeError, AttributeError):  # unreadable, or not a job.json
            same = False
        if not same:
            warnings.warn(
                f"{folder} holds shards of a job with another input, model or options; starting over",
                stacklevel=2,
            )
            shutil.rmtree(folder)
    if not folder.is_dir():
        from metaeol_edge.files import atomic_write

        folder.mkdir(parents=True)
        with atomic_write(stamp) as f:
            f.write(json.dumps(identity, indent=1).encode("utf-8"))
    for leftover in folder.glob(".*.part"):  # what a kill left mid-write
        leftover.unlink(missing_ok=True)
    return {int(p.stem) for p in folder.glob("*.npy") if p.stem.isdigit()}


def _write_shard(folder: Path, index: int, vectors: np.ndarray, output: Path) -> None:
    from metaeol_edge.files import atomic_write

    try:
        with atomic_write(_shard_path(folder, index)) as f:
            # Header and bytes written here rather than by np.save, whose short-write error hides the errno.
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            header = {
                "descr": np.lib.format.dtype_to_descr(vectors.dtype),
                "fortran_order": False,
                "shape": vectors.shape,
            }
            np.lib.format.write_array_header_1_0(f, header)
            f.write(vectors.tobytes())
    except OSError as exc:  # a full disk: name the user's output, not the shard's temporary file
        raise InputError(f"cannot write output {output}: {exc.strerror or exc}") from exc


def _load_shard(folder: Path, index: int, rows: int) -> np.ndarray:
    path = _shard_path(folder, index)
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise InputError(f"shard {path} is unreadable ({exc}); it was removed: run the same command again") from exc
    if vectors.ndim < 3 or vectors.shape[1] != rows:
        path.unlink(missing_ok=True)
        raise InputError(f"shard {path} has {vectors.shape} vectors, not {rows} rows; it was removed: run again")
    return vectors


def embed_file(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: EmbedConfig | dict[str, Any],
    *,
    fmt: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
    encode: EncodeOptions = EncodeOptions(),  # noqa: B008 - frozen
    workers: int | str = 1,
    threads: int | None = None,
    ray: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    show_progress: bool = True,
) -> BulkReport:
    """Embed every row of ``input`` into ``output``, resumably, on ``workers`` processes or Ray actors.

    ``config``: the embedder's configuration, or ``MetaEOL``'s keyword arguments
    (``model``, ``templates``, ``layer``, ...) as 0.2 took them. ``workers``: processes (or, with ``ray``, actors), or
    ``"auto"``; ``threads``: the engine threads of all workers together (default:
    the usable cores), split evenly. ``ray``: ``local``, ``auto`` or a cluster
    address. The output appears only when complete; shards of an unfinished job
    wait in ``OUTPUT.shards/`` for the same command to continue them.
    """
    output = check_output(output, (input,))
    with job_lock(output):  # held until the output is in place and the shards are gone
        return _embed_file(
            input,
            output,
            config if isinstance(config, EmbedConfig) else EmbedConfig.of(**config),
            fmt=fmt,
            text_column=text_column,
            id_column=id_column,
            encode=encode,
            workers=workers,
            threads=threads,
            ray=ray,
            shard_size=shard_size,
            show_progress=show_progress,
        )


def _embed_file(
    input: str | os.PathLike[str],
    output: Path,
    config: EmbedConfig,
    *,
    fmt: str | None,
    text_column: str,
    id_column: str | None,
    encode: EncodeOptions,
    workers: int | str,
    threads: int | None,
    ray: str | None,
    shard_size: int,
    show_progress: bool,
) -> BulkReport:
    from metaeol_edge.core.embedder import MetaEOL

    source = Source(Path(input), fmt, text_column, id_column)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard size must be a positive number of rows, not {shard_size!r}")
    if not isinstance(encode.batch_size, int) or encode.batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, not {encode.batch_size!r}")
    rows = count_sentences(source.path, fmt, text_column, id_column)  # every row checked before any work
    if id_column is not None and output.suffix.lower() == ".npy":
        raise InputError("a .npy output holds vectors only; write .jsonl or .parquet to keep the ids")
    start = time.monotonic()
    model = MetaEOL.from_config(config)  # checks every option and reads the model's header; loads nothing yet
    folder = shards_dir(output)
    ours = False  # whether the folder is this job's (and so may be cleaned up)
    try:
        n_workers = _workers(workers, model, ray)
        cores = threads or usable_cores()
        if n_workers < 1 or cores < 1:
            raise InputError("workers and threads must be at least 1")
        identity = job_identity(source, rows, shard_size, model, model.resolved_config, encode)
        done = _prepare(folder, identity)
        ours = True
        n_shards = math.ceil(rows / shard_size)
        resumed = sum(min(shard_size, rows - i * shard_size) for i in done if i < n_shards)
        n_workers = max(1, min(n_workers, n_shards - len(done)))  # a worker with no shard would load for nothing
        report = BulkReport(output, rows, resumed_rows=resumed, shards=n_shards)
        todo = (
            (i, i * shard_size, [text for _, text in group])
            for i, group in enumerate(source.shards(shard_size))
            if i not in done
        )
        # Workers run the level and backend chosen here: `auto` decided on another machine could differ.
        pinned = model.resolved_config.replace(level=model.level)
        if ray is not None:
            executor: Any = RayPool(pinned, encode, n_workers, max(1, cores // n_workers), ray)
        elif n_workers > 1:
            model.close()
            executor = ProcessPool(pinned, encode, n_workers, max(1, cores // n_workers))
        else:
            if threads is not None:
                model.close()
                model = MetaEOL.from_config(pinned.replace(n_threads=threads))
            executor = InProcess(model, encode)
        bar = _bar(rows, resumed, show_progress, executor.name)
        finished = False
        try:
            for index, result in executor.run(todo, bar.update if bar is not None else lambda n: None):
                _write_shard(folder, index, result.vectors, output)
                for message in result.warnings:
                    warnings.warn(message, stacklevel=2)
                report.hits += result.hits
                report.misses += result.misses
                report.workers[result.worker] = max(report.workers.get(result.worker, 0.0), result.peak_rss_mb)
            finished = True
        finally:
            if bar is not None:
                bar.close()
            (executor.close if finished else executor.kill)()
        report.shape = _assemble(folder, output, source, rows, shard_size)
        shutil.rmtree(folder, ignore_errors=True)
        report.seconds = time.monotonic() - start
        return report
    except BaseException:
        if ours and folder.is_dir():
            kept = len(list(folder.glob("*.npy")))
            if not kept:
                shutil.rmtree(folder, ignore_errors=True)  # nothing to resume: leave nothing behind
            else:
                warnings.warn(
                    f"{kept} finished shard(s) of {math.ceil(rows / shard_size)} are kept in {folder}: "
                    "the same command continues from them",
                    stacklevel=2,
                )
        raise
    finally:
        model.close()


@contextmanager
def job_lock(output: Path) -> Iterator[None]:
    """Hold the job of ``output`` alone: a second job of the same output (started while the first
    runs) is refused at once, before it reads or writes anything. Two at once used to interleave
    in one shards folder, and one's clean-up left a folder every later run refused.

    An exclusive ``flock`` on ``.OUTPUT.lock`` beside the output; the kernel releases it when
    the process dies, so a killed job never blocks the next. The holder removes the file before
    letting go; a job that locked a file already removed tries again on the new one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run one job per output there
        yield
        return
    path = output.with_name(f".{output.name}.lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"cannot create the job's lock file {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(
                f"another job is writing {output} right now (it holds {path}): wait for it to finish, "
                "or name another output"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file it locked was removed by a job that just finished: lock the new one
    try:
        yield
    finally:
        Path(path).unlink(missing_ok=True)
        os.close(fd)


def _workers(workers: int | str, model: Any, ray: str | None = None) -> int:
    if isinstance(workers, str) and workers != "auto":
        if not workers.isdigit():
            raise InputError(f"workers must be a number or 'auto', not {workers!r}")
        workers = int(workers)
    blocked = None if ray is not None else spawn_blocker()
    if workers == "auto":
        # PyTorch runs every core in one process; llama.cpp's small models go faster as one process per core.
        n = 1 if model.resolved_config.backend == "pytorch" else auto_workers(model.info.size)
        if n > 1 and blocked:
            warnings.warn(f"embedding in this process, not {n} worker processes: {blocked}", stacklevel=3)
            return 1
        return n
    if workers > 1 and blocked:
        raise InputError(f"--workers {workers} needs worker processes, which cannot start here: {blocked}")
    return workers


def spawn_blocker(main: Any = None) -> str | None:
    """Why spawned worker processes cannot start from this program, or None.

    A spawned child first re-runs the parent's ``__main__`` from its file. A
    program read from standard input (``python - < job.py``) or typed into a
    notebook cell or a shell has no such file, and every child would die at start.
    """
    main = sys.modules.get("__main__") if main is None else main
    path = getattr(main, "__file__", None)
    if path is None:
        return "the program has no file (an interactive session or a notebook) for a worker process to start from"
    if not os.path.isfile(path):
        return f"the program's file {path!r} does not exist (read from standard input?) for a worker to start from"
    return None


def _bar(total: int, initial: int, show: bool, name: str):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, unit="row", desc=f"embedding ({name})", file=sys.stderr, dynamic_ncols=True
    )


def _assemble(folder: Path, output: Path, source: Source, rows: int, shard_size: int) -> tuple[int, ...]:
    """Write the output from the shards, in order.

    A .jsonl or .parquet output carries each row's text or id: those come from a
    second pass over the input. A .npy output holds vectors only, so the shards
    alone make it, without reading the input again.
    """
    first = _load_shard(folder, 0, min(shard_size, rows))
    layers, shape = first.shape[0], first.shape[2:]
    id_type = id_arrow_type(source.path, source.fmt, source.id_column)  # a Parquet input's, kept exactly
    with VectorWriter(output, rows, shape, layers=layers, ids=source.id_column is not None, id_type=id_type) as writer:
        if writer.kind == "npy":
            groups: Iterator[list[Record]] = (
                [(None, "")] * min(shard_size, rows - start) for start in range(0, rows, shard_size)
            )
        else:
            groups = source.shards(shard_size)
        for i, group in enumerate(groups):
            vectors = _load_shard(folder, i, len(group))
            texts = [text for _, text in group]
            ids = [id_ for id_, _ in group] if source.id_column is not None else None
            writer.write(texts, list(vectors) if layers > 1 else vectors[0], ids)
    return (layers, rows, *shape) if layers > 1 else (rows, *shape)


# -- Ray Data ------------------------------------------------------------------------


class DatasetEmbedder:
    """``map_batches`` callable class: one model per actor, loaded once, embedding a column of each batch."""

    def __init__(self, config: EmbedConfig, column: str, output_column: str, encode: EncodeOptions) -> None:
        from metaeol_edge.core.embedder import MetaEOL

        self.model = MetaEOL.from_config(config)
        self.column, self.output_column, self.encode = column, output_column, encode

    def __call__(self, batch: Any) -> Any:
        from metaeol_edge.faces.corpus import _fixed_size_lists

        if self.column not in batch.column_names:
            raise InputError(f"the dataset has no column {self.column!r}; its columns: {batch.column_names}")
        texts = batch.column(self.column).to_pylist()
        result = embed_shard(self.model, texts, self.encode)
        vectors = result.vectors[0] if result.vectors.shape[0] == 1 else np.moveaxis(result.vectors, 0, 1)
        return batch.append_column(self.output_column, _fixed_size_lists(np.ascontiguousarray(vectors)))


def embed_dataset(
    ds: Any,
    model: str | os.PathLike[str] | None = None,
    templates: str = "metaeol",
    *,
    column: str = "text",
    output_column: str = "embedding",
    concurrency: int = 1,
    num_cpus: float = 1,
    batch_size: int = 32,
    normalize_embeddings: bool = False,
    **options: Any,
) -> Any:
    """A Ray Dataset with an ``embedding`` column (fixed-size lists of float32) added; every other column kept.

    ``concurrency`` actors, each reserving ``num_cpus`` CPUs and running the
    engine with that many threads, each loading the model once (a registry id
    is pulled on each node through the registry, SHA-256 checked; a path must
    exist on every node: shared storage) and using its node's cache. Other
    keyword arguments go to ``MetaEOL`` (``layer``, ``method``, ``cache``, ...).
    The vectors are those of ``MetaEOL.encode``, bit for bit. Lazy, as every
    Ray Dataset: nothing runs until the result is consumed or written.
    """
    if not isinstance(concurrency, int) or concurrency < 1:
        raise InputError(f"concurrency must be a positive integer, not {concurrency!r}")
    if not num_cpus > 0:
        raise InputError(f"num_cpus must be positive, not {num_cpus!r}")
    _import_ray()
    config = EmbedConfig.of(**(dict(model=model, templates=templates, n_threads=max(1, int(num_cpus))) | options))
    return ds.map_batches(
        DatasetEmbedder,
        fn_constructor_kwargs=dict(
            config=config,
            column=column,
            output_column=output_column,
            encode=EncodeOptions(batch_size, normalize_embeddings, False),
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=concurrency,
        num_cpus=num_cpus,
    )


__all__ = [
    "BulkReport",
    "DatasetEmbedder",
    "EncodeOptions",
    "auto_workers",
    "embed_dataset",
    "embed_file",
    "ray_init",
]
