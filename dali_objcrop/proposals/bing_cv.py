"""The reference BING: ``cv2.saliency.ObjectnessBING`` with its pitfalls handled.

Pitfalls (measured on OpenCV 5.0 contrib; see ``models/bing/SOURCE.txt`` in the shared data):

* boxes are int32 ``[minX, minY, maxX, maxY]`` with a 1-based inclusive min corner, shaped
  (N, 4) on 5.x and (N, 1, 4) on 4.x: we reshape and convert to 0-based exclusive
  ``[minX - 1, minY - 1, maxX, maxY]``;
* every colour model found in the training folder runs and the lists are concatenated, not
  re-sorted: each instance gets a private folder linking only the chosen colour's files;
* ``getobjectnessValues()`` is ``(rank + 300) * {1, 3, 5}``, not a score: no scores here;
* every call writes ``<BBResDir>/BBoxesB2W8*/bb.txt`` (default: the filesystem root): the
  results folder is a private temporary folder;
* timings and "Can't load model" go to C stdout / OpenCV's log on stderr: both file
  descriptors are pointed at /dev/null around the call (C buffers flushed first);
* a shared instance gives wrong results across threads: one :class:`OpenCVBing` per thread
  or process (the driver makes one per worker process);
* non-uint8 or non-3-channel input is accepted silently and gives garbage: rejected here;
* windows are 16..512 px: callers pass images downscaled to a long side <= 512
  (:func:`~dali_objcrop.proposals.common.load_for_proposals`), 3x faster and no worse.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from .common import check_bgr_u8

COLORS = ("MAXBGR", "HSV", "I")
MODEL_PARTS = ("wS1", "wS2", "idx")
_FD_LOCK = threading.Lock()


def model_files(model_dir: str | os.PathLike, color: str = "MAXBGR") -> list[Path]:
    """The three files of one colour model in ``model_dir`` (raises if any is missing)."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    d = Path(model_dir)
    files = [d / f"ObjNessB2W8{color}.{p}.yml.gz" for p in MODEL_PARTS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"BING model files missing: {', '.join(missing)} "
                                f"(run `dali-objcrop fetch-model bing` or pass --model-dir)")
    return files


@contextlib.contextmanager
def quiet_fds():
    """Point C-level stdout and stderr at /dev/null for the duration (flushing C and Python
    buffers on both sides, so no noise leaks out later and nothing of ours is lost)."""
    libc = ctypes.CDLL(None)
    with _FD_LOCK:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved + [null]:
                os.close(fd)


class OpenCVBing:
    """One ``cv2.saliency.ObjectnessBING`` instance with a private model and results folder.

    Args:
        model_dir: folder with ``ObjNessB2W8<color>.{wS1,wS2,idx}.yml.gz``.
        color: colour model, ``MAXBGR`` (fast default), ``HSV`` or ``I``.
        quiet: silence the C stdout/stderr noise of every call.

    Not thread-safe by design (OpenCV's instance is not): make one per thread or process.
    """

    def __init__(self, model_dir: str | os.PathLike, color: str = "MAXBGR", quiet: bool = True) -> None:
        import cv2
        if not hasattr(cv2, "saliency"):
            raise ImportError("cv2.saliency is missing: install opencv-contrib-python(-headless)")
        files = model_files(model_dir, color)
        self.color = color
        self.quiet = quiet
        self._tmp = tempfile.mkdtemp(prefix="dali_objcrop_bing_")
        for f in files:  # only this colour's files: OpenCV would run (and concatenate) every model it finds
            shutil.copyfile(f, os.path.join(self._tmp, f.name))
        self._bing = cv2.saliency.ObjectnessBING_create()
        self._bing.setTrainingPath(self._tmp)
        self._bing.setBBResDir(os.path.join(self._tmp, "results"))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """All of OpenCV's boxes for a uint8 BGR image, best-first.

        Returns:
            (N, 4) int32 pixel boxes ``[x1, y1, x2, y2)``, 0-based, exclusive right/bottom.
        """
        img = check_bgr_u8(img)
        ctx = quiet_fds() if self.quiet else contextlib.nullcontext()
        with ctx:
            ok, boxes = self._bing.computeSaliency(img)
        if not ok or boxes is None:
            raise RuntimeError(f"ObjectnessBING failed (model folder {self._tmp} unreadable?)")
        b = np.asarray(boxes, dtype=np.int32).reshape(-1, 4).copy()  # (N,4) on 5.x, (N,1,4) on 4.x
        b[:, :2] -= 1  # 1-based inclusive min corner -> 0-based; max corner inclusive == exclusive 0-based
        return b

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self) -> None:  # best effort: the folder is small and in /tmp anyway
        try:
            self.close()
        except Exception:
            pass
