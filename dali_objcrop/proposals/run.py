"""The resumable, multi-process proposal driver: a dataset in, one box store out.

Work is cut into chunks of consecutive images.  Each chunk's result goes to its own file
in ``<out>.parts/`` (written to a temporary name and renamed, so a chunk file is complete
or absent); ``<out>.parts/job.json`` pins what the chunks were computed with.  A rerun of
the same command after a kill skips finished chunks, so nothing is lost and nothing
counted twice.  When every chunk is there, the store is assembled in dataset order and
saved atomically, then the parts folder is removed.  Results depend only on the images
and the parameters (never on the number of workers or on interruptions), so a resumed
run writes the same store as an uninterrupted one.

Images that cannot be decoded or processed get no boxes, are listed in the store's
``meta["failures"]`` with the reason, and are reported at the end; files that the index
scan already rejected (empty, truncated, not an image) are listed in
``meta["skipped_by_scan"]`` and are not rows of the store.

A job owns its output: it holds an exclusive lock (``fcntl.flock``) on ``<out>.lock``
from start to finish, so a second job on the same ``--out`` stops at once with an error
naming the lock file and the holder.  Every chunk file records the digest of its job's
parameters and its rows; on resume a chunk of another job is refused (or, with
``--restart``, discarded).  Worker processes die with their parent (``PR_SET_PDEATHSIG``
plus a parent-pid watchdog), so killing a job leaves no process behind.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import faults
from ..boxstore import BoxStore
from ..dataset import ImageIndex, check_found, fingerprint
from ..joblock import JobLock, OutputLockedError  # noqa: F401  (OutputLockedError: re-exported)
from .common import PROPOSAL_MAX_SIDE, load_for_proposals
from .methods import METHODS, make_detector, model_digest, propose_image, resolve_model_dir

JOB_VERSION = 2


def output_lock(out: Path) -> JobLock:
    """The lock a proposals job holds on its output ``out``: ``<out>.lock``."""
    return JobLock(out.with_name(out.name + ".lock"), "proposals job")


@dataclass(frozen=True)
class ProposalJob:
    """What a proposal run computes (everything that changes the output).

    Args:
        method: one of ``bing``, ``bing-opencv``, ``selective-search`` (``gt`` is not a job).
        top_k: boxes kept per image after NMS.
        nms_iou: IoU above which a lower-ranked box is suppressed (1.0 disables NMS).
        max_side: long-side limit of the image the method sees.
        model_dir: BING model folder (None: the packaged model).
        color: BING colour model.
        ss_mode: selective-search strategy.
        bing_nms_rounds: None (default): our BING, exact (OpenCV's boxes), computing lazily only
            what the top k after NMS needs; a number caps the per-size NMS rounds instead
            (an approximation, kept for comparison).
    """

    method: str = "bing"
    top_k: int = 10
    nms_iou: float = 0.5
    max_side: int = PROPOSAL_MAX_SIDE
    model_dir: str | None = None
    color: str = "MAXBGR"
    ss_mode: str = "fast"
    bing_nms_rounds: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.method == "gt":
            raise ValueError(f"method must be one of {[m for m in METHODS if m != 'gt']}, got {self.method!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_side < 16:
            raise ValueError(f"max_side must be >= 16, got {self.max_side}")

    def params(self) -> dict:
        """The parameters recorded in the store (the model by content hash, not by path)."""
        p = asdict(self)
        if self.method.startswith("bing"):
            p["model_sha256"] = model_digest(resolve_model_dir(self.model_dir), self.color)
            p["model_dir"] = str(resolve_model_dir(self.model_dir))
        else:
            p.pop("model_dir"), p.pop("color")
        if self.method != "bing":
            p.pop("bing_nms_rounds")
        if self.method != "selective-search":
            p.pop("ss_mode")
        return p


@dataclass
class RunReport:
    """Counts of one driver run (also printed by the CLI)."""

    images: int = 0
    computed: int = 0
    resumed: int = 0
    failed: int = 0
    skipped_by_scan: int = 0
    seconds: float = 0.0
    failures: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


# ---- worker side --------------------------------------------------------------------------
_DETECTOR = None
_JOB: ProposalJob | None = None


def _die_with_parent(parent: int) -> None:
    """Make this worker process exit when ``parent`` does (SIGTERM, SIGKILL, a crash alike).

    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux; as a second line (other systems, or a parent
    that died before the prctl call), a daemon thread polls the parent pid once a second."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent is already gone
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)
    threading.Thread(target=watch, name="objcrop-parent-watchdog", daemon=True).start()


def _init_worker(job: ProposalJob, threads: int, parent: int | None = None) -> None:
    """One detector per process (OpenCV's BING must not be shared); single-threaded OpenCV
    when several processes share the cores.  A worker (``parent`` given) exits with its parent."""
    global _DETECTOR, _JOB
    if parent is not None:
        _die_with_parent(parent)
    import cv2
    if threads > 0:
        cv2.setNumThreads(threads)
    _JOB = job
    _DETECTOR = make_detector(job.method, job.model_dir, job.color, job.ss_mode, job.bing_nms_rounds,
                              top_k=job.top_k, nms_iou=job.nms_iou)


def _chunk_path(parts: Path, chunk: int) -> Path:
    return parts / f"chunk_{chunk:07d}.npz"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all; a failed write (a full disk) names the file."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(e.errno, f"{'disk full: ' if e.errno == errno.ENOSPC else ''}cannot write {path}: "
                               f"{e.strerror or e}; finished chunks are kept, rerun to resume") from e


def process_chunk(task: tuple[int, list[int], list[str], np.ndarray, str, str]) -> tuple[int, int, int]:
    """Compute one chunk and write its file; returns ``(chunk, images, failures)``."""
    chunk, rows, paths, sizes, parts, job_digest = task
    counts, boxes, scores, failed = [], [], [], {}
    for row, path, size in zip(rows, paths, sizes):
        try:
            img = load_for_proposals(path, (int(size[0]), int(size[1])), _JOB.max_side)
            b, s = propose_image(img, _DETECTOR, _JOB.top_k, _JOB.nms_iou)
        except Exception as e:  # recorded, never fatal
            failed[int(row)] = f"{type(e).__name__}: {e}"
            b, s = np.zeros((0, 4), np.float32), None
        counts.append(len(b))
        boxes.append(b)
        scores.append(np.zeros(len(b), np.float32) if s is None else s)
    has_scores = _JOB.method == "bing"
    buf = io.BytesIO()
    np.savez(buf, rows=np.asarray(rows, np.int64), counts=np.asarray(counts, np.int64),
             boxes=np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
             scores=np.concatenate(scores).astype(np.float32), has_scores=np.array(has_scores),
             failures=np.array(json.dumps(failed)), job=np.array(job_digest))
    _write_atomic(_chunk_path(Path(parts), chunk), buf.getvalue())
    return chunk, len(rows), len(failed)


def _read_chunk(path: Path) -> dict | None:
    """A finished chunk's arrays, or None if the file is unreadable (then it is redone).

    ``allow_pickle`` stays off: a chunk file is data, never code."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None


def job_digest(job_meta: dict) -> str:
    """sha256 of a job's description (parameters, image list, chunking): what ties a chunk to its job."""
    return hashlib.sha256(json.dumps(job_meta, sort_keys=True).encode()).hexdigest()


def _chunk_problem(z: dict, digest: str, rows: range) -> str | None:
    """Why a chunk file does not belong to this job (None if it does)."""
    if "job" not in z:
        return "it records no job (written by an older version)"
    if str(z["job"]) != digest:
        return f"it was computed by another job ({str(z['job'])[:12]}, this job {digest[:12]})"
    if z["rows"].tolist() != list(rows):
        return "its rows differ from this job's chunking"
    if len(z["counts"]) != len(rows) or int(z["counts"].sum()) != len(z["boxes"]):
        return "its arrays are inconsistent"
    return None


# ---- driver -------------------------------------------------------------------------------
def _prepare_parts(parts: Path, job_meta: dict, restart: bool) -> None:
    meta_path = parts / "job.json"
    if restart and parts.exists():
        shutil.rmtree(parts)
    if parts.exists() and not meta_path.exists() and any(parts.glob("chunk_*.npz")):
        raise ValueError(f"{parts} holds chunk files but no job.json (unknown parameters); pass --restart "
                         f"to discard them")
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_path} is unreadable ({e}); pass --restart to discard the partial results")
        if old != job_meta:
            diff = sorted(k for k in set(old) | set(job_meta) if old.get(k) != job_meta.get(k))
            raise ValueError(f"{parts} holds partial results of another job (differs in {', '.join(diff)}); "
                             f"rerun with the same arguments to resume, or pass --restart to discard them")
        return
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(meta_path, json.dumps(job_meta, sort_keys=True).encode())


def run_proposals(index: ImageIndex, out: str | os.PathLike, job: ProposalJob, workers: int = 1,
                  chunk_size: int = 64, restart: bool = False, progress: bool = True,
                  max_chunks: int | None = None) -> tuple[BoxStore | None, RunReport]:
    """Compute proposals for every image of ``index`` and write the store to ``out``.

    Args:
        index: the images (keys, paths, sizes); ``index.bad`` is reported as skipped.
        out: the ``.boxes`` file to write.
        job: method and parameters.
        workers: worker processes (1: in this process).
        chunk_size: images per chunk file (the unit of resumption).
        restart: discard partial results of an earlier run instead of resuming.
        progress: show a tqdm bar (rate and ETA).
        max_chunks: stop after computing this many chunks (a time-bounded run; rerun to go on).

    Returns:
        ``(store, report)``; ``store`` is None when ``max_chunks`` stopped the run early.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(index) == 0:
        raise ValueError(f"no usable images in {index.root} ({len(index.bad)} files rejected by the scan, e.g. "
                         f"{', '.join(list(index.bad)[:3])}): nothing to compute")
    out = Path(out)
    with output_lock(out):
        return _run_locked(index, out, job, workers, chunk_size, restart, progress, max_chunks)


def _run_locked(index: ImageIndex, out: Path, job: ProposalJob, workers: int, chunk_size: int, restart: bool,
                progress: bool, max_chunks: int | None) -> tuple[BoxStore | None, RunReport]:
    parts = out.with_name(out.name + ".parts")
    params = job.params()
    job_meta = {"version": JOB_VERSION, "params": params, "fingerprint": fingerprint(index.keys),
                "num_images": len(index), "chunk_size": chunk_size}
    digest = job_digest(job_meta)
    _prepare_parts(parts, job_meta, restart)

    n = len(index)
    n_chunks = -(-n // chunk_size)
    done = set()
    for c in range(n_chunks):
        if not _chunk_path(parts, c).exists():
            continue
        z = _read_chunk(_chunk_path(parts, c))
        if z is None:
            continue  # unreadable (a torn write cannot happen, but a damaged disk can): redone
        why = _chunk_problem(z, digest, range(c * chunk_size, min(n, (c + 1) * chunk_size)))
        if why is not None:
            raise ValueError(f"{_chunk_path(parts, c)} does not belong to this job: {why}; pass --restart to "
                             f"discard the partial results in {parts}")
        done.add(c)
    todo = [c for c in range(n_chunks) if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    paths = index.paths
    report = RunReport(images=n, skipped_by_scan=len(index.bad))
    report.resumed = sum(min(chunk_size, n - c * chunk_size) for c in done)

    def task(c: int):
        rows = list(range(c * chunk_size, min(n, (c + 1) * chunk_size)))
        return c, rows, [paths[r] for r in rows], index.sizes[rows[0]:rows[-1] + 1], str(parts), digest

    from tqdm import tqdm
    bar = tqdm(total=n, initial=report.resumed, unit="img", desc=f"proposals ({job.method})",
               disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        if workers == 1:
            _init_worker(job, threads=0)
            for c in todo:
                _, k, f = process_chunk(task(c))
                report.computed += k
                bar.update(k)
                faults.point("proposals.chunk")
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
            from concurrent.futures.process import BrokenProcessPool
            ctx = mp.get_context("spawn")  # no forked OpenCV/thread state in the workers
            # a bounded window of submitted chunks; a worker that dies (e.g. a crash inside a
            # decoder) breaks the pool: finished chunks stay on disk and a rerun resumes
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(job, 1, os.getpid())) as ex:
                pending, it = set(), iter(todo)
                try:
                    while True:
                        while len(pending) < 4 * workers and (c := next(it, None)) is not None:
                            pending.add(ex.submit(process_chunk, task(c)))
                        if not pending:
                            break
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            _, k, _ = fut.result()
                            report.computed += k
                            bar.update(k)
                            faults.point("proposals.chunk")
                except BrokenProcessPool as e:
                    raise RuntimeError(f"a worker process died ({e}); {report.computed} images of this run are "
                                       f"saved in {parts}: rerun the same command to resume") from e
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0

    if len(done) + len(todo) < n_chunks:
        return None, report
    store = assemble(index, parts, n_chunks, job, params, digest)
    report.failures = store.meta["failures"]
    report.failed = len(report.failures)
    store.save(out)
    shutil.rmtree(parts, ignore_errors=True)
    return store, report


def assemble(index: ImageIndex, parts: Path, n_chunks: int, job: ProposalJob, params: dict,
             digest: str | None = None) -> BoxStore:
    """Concatenate the chunk files (in dataset order) into a validated :class:`BoxStore`
    (with ``digest``, every chunk must carry it: see :func:`job_digest`)."""
    boxes, scores, failures = [], [], {}
    has_scores = True
    for c in range(n_chunks):
        z = _read_chunk(_chunk_path(parts, c))
        if z is None:
            raise RuntimeError(f"chunk file {_chunk_path(parts, c)} is missing or unreadable; rerun to redo it")
        rows = z["rows"].tolist()
        why = None if digest is None else _chunk_problem(z, digest, range(rows[0], rows[0] + len(rows))
                                                         if rows else range(0))
        if why is not None:
            raise RuntimeError(f"{_chunk_path(parts, c)} does not belong to this job: {why}; rerun with --restart")
        has_scores &= bool(z["has_scores"])
        splits = np.cumsum(z["counts"])[:-1]
        boxes += np.split(z["boxes"], splits)
        scores += np.split(z["scores"], splits)
        failures.update({index.keys[int(r)]: msg for r, msg in json.loads(str(z["failures"])).items()})
    store = BoxStore.from_arrays(index.keys, index.sizes, boxes, scores if has_scores else None,
                                 method=job.method, params=params, normalized=True, top_k=job.top_k)
    store.meta["failures"] = failures
    store.meta["num_failed"] = len(failures)
    store.meta["skipped_by_scan"] = dict(index.bad)
    return store


def load_index(source: str | os.PathLike, images: str | os.PathLike | None = None, check: bool = True,
               allow_outside_root: bool = False) -> ImageIndex:
    """The image index (:func:`dali_objcrop.index.open_index`: built once, then mapped) of an image
    folder, or a COCO JSON (its images where :func:`~dali_objcrop.dataset.coco_images_dir`
    finds them: ``images``, else ``images/`` beside the JSON or beside its folder).

    Raises:
        FileNotFoundError: the source does not exist, or (almost) none of its images are found.
    """
    from ..index import index_of   # the one data -> index function (built once, then memory-mapped)
    source = Path(source)
    if not (source.is_dir() or (source.is_file() and source.suffix.lower() == ".json")):
        raise FileNotFoundError(f"{source} is neither an image folder nor a COCO .json file")
    index, _ = index_of(source, images, allow_outside_root, check=check)
    if source.is_dir():
        check_found(index, source)
    return index
