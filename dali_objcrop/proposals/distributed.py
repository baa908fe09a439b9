"""Proposals across machines with the launcher you already have (torchrun, a Slurm job array).

Each process computes one *part*: a disjoint, deterministic slice of the image list, fixed by
``(part, num_parts)`` alone -- blocks of ``block`` consecutive images dealt round-robin
(block ``b`` goes to part ``b % num_parts``, which balances parts when image cost drifts along
the list).  A part is an ordinary resumable :func:`~dali_objcrop.proposals.run.run_proposals`
job on its slice, writing ``<out>.part-PPPPP-of-NNNNN.boxes`` (its chunks, lock and resume
rules are those of the one-machine driver).  :func:`merge_parts` then writes ``<out>``: the
same store as a one-process run over the whole list, box for box and byte for byte (same
rows, boxes, scores, validation counts, failures in dataset order).

Where the part comes from (:func:`resolve_part`): explicit ``part``/``num_parts``, else
``SLURM_ARRAY_TASK_ID`` (minus ``SLURM_ARRAY_TASK_MIN``) of ``SLURM_ARRAY_TASK_COUNT``, else
torchrun's ``RANK``/``WORLD_SIZE``, else the whole list.

:func:`propose_shards` does the same from a shard set into a new shard set (the images
copied byte for byte, the boxes replaced), a part taking every ``num_parts``-th shard;
:func:`finish_shards` writes the new set's ``shards.json`` once every shard is there.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..boxstore import BoxStore, ValidationReport, validate_boxes
from ..dataset import ImageIndex, fingerprint
from .run import ProposalJob, RunReport, run_proposals

DEFAULT_BLOCK = 64


def resolve_part(part: int | None = None, num_parts: int | None = None,
                 env: dict | None = None) -> tuple[int, int]:
    """``(part, num_parts)``: the arguments, else a Slurm array task, else torchrun's rank, else (0, 1)."""
    env = os.environ if env is None else env
    if part is None and num_parts is None:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            part = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            num_parts = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "WORLD_SIZE" in env:
            part, num_parts = int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
        else:
            part, num_parts = 0, 1
    if part is None or num_parts is None:
        raise ValueError("give both part and num_parts (or neither, to read them from Slurm / torchrun)")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")
    return int(part), int(num_parts)


def part_positions(n: int, part: int, num_parts: int, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """Dataset positions of a part: blocks of ``block`` images, block ``b`` to part ``b % num_parts``."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    pos = np.arange(n, dtype=np.int64)
    return pos[(pos // block) % num_parts == part]


def part_path(out: str | os.PathLike, part: int, num_parts: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.part-{part:05d}-of-{num_parts:05d}.boxes")


def split_path(out: str | os.PathLike) -> Path:
    """``<out>.split.json``: how the parts of ``out`` cut the image list (written by every part, read by merge)."""
    out = Path(out)
    return out.with_name(out.name + ".split.json")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sub_index(index: ImageIndex, pos: np.ndarray) -> ImageIndex:
    return ImageIndex(root=index.root, keys=[index.keys[i] for i in pos], sizes=np.asarray(index.sizes)[pos],
                      bad={})


def run_part(index: ImageIndex, out: str | os.PathLike, job: ProposalJob, part: int | None = None,
             num_parts: int | None = None, block: int = DEFAULT_BLOCK, **kwargs) -> tuple[BoxStore | None,
                                                                                          RunReport]:
    """Compute one part's proposals into its own resumable store (see the module doc).

    Args:
        index: the whole image list (every part must be given the same one).
        out: the final store's path; the part writes ``part_path(out, part, num_parts)``.
        job: method and parameters (the same on every part).
        part, num_parts: see :func:`resolve_part`.
        block: images per dealt block.
        kwargs: :func:`run_proposals` options (``workers``, ``chunk_size``, ``restart``, ``progress``,
            ``max_chunks``).

    Returns:
        ``run_proposals``' ``(store or None, report)`` for the part.
    """
    part, num_parts = resolve_part(part, num_parts)
    pos = part_positions(len(index), part, num_parts, block)
    if len(pos) == 0:
        raise ValueError(f"part {part} of {num_parts} holds no image ({len(index)} images, blocks of {block})")
    split = {"num_parts": num_parts, "block": block, "num_images": len(index), "fingerprint": fingerprint(index.keys)}
    sp = split_path(out)
    if sp.exists() and json.loads(sp.read_text()) != split:
        raise ValueError(f"{sp} records another split of this output ({sp.read_text().strip()}); every part of a "
                         f"run must get the same images, --num-parts and --block")
    if not sp.exists():
        _write_atomic(sp, json.dumps(split, sort_keys=True))
    return run_proposals(_sub_index(index, pos), part_path(out, part, num_parts), job, **kwargs)


def merge_parts(index: ImageIndex, out: str | os.PathLike, num_parts: int | None = None, block: int | None = None,
                keep_parts: bool = False) -> BoxStore:
    """Merge the parts' stores into ``out``: the store a one-process run writes.

    ``num_parts`` and ``block`` default to what the parts recorded in :func:`split_path`.

    Raises:
        FileNotFoundError: parts are missing (named: rerun them).
        ValueError: a part was computed for other images or with other parameters.
    """
    sp = split_path(out)
    split = json.loads(sp.read_text()) if sp.exists() else {}
    num_parts = num_parts or split.get("num_parts")
    block = block or split.get("block", DEFAULT_BLOCK)
    if not num_parts:
        raise FileNotFoundError(f"no part of {out} has run yet ({sp} is missing); give num_parts")
    if split and (split["num_parts"], split["block"]) != (num_parts, block):
        raise ValueError(f"the parts of {out} were cut into {split['num_parts']} parts of blocks of {split['block']}, "
                         f"not {num_parts} / {block}")
    paths = [part_path(out, p, num_parts) for p in range(num_parts)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num_parts} parts are not finished: {', '.join(missing[:8])}"
                                f"; rerun those parts (they resume), then merge")
    n = len(index)
    boxes: list = [None] * n
    scores: list = [None] * n
    failures: dict[int, str] = {}
    params = method = None
    report = ValidationReport()
    has_scores = True
    for p, path in enumerate(paths):
        st = BoxStore.load(path)
        pos = part_positions(n, p, num_parts, block)
        if list(st.keys) != [index.keys[i] for i in pos]:
            raise ValueError(f"{path} was computed for another image list or split (part {p} of {num_parts}, "
                             f"blocks of {block})")
        if params is None:
            params, method = st.meta.get("params"), st.meta.get("method")
        elif st.meta.get("params") != params or st.meta.get("method") != method:
            raise ValueError(f"{path} was computed with other parameters than {paths[0]}")
        report = report + ValidationReport(**{k: v for k, v in st.meta.get("validation", {}).items()
                                              if k in ValidationReport().__dict__})
        has_scores &= st.scores is not None
        key_pos = {index.keys[i]: int(i) for i in pos}
        for k, why in st.meta.get("failures", {}).items():
            failures[key_pos[k]] = why
        for r, i in enumerate(pos):
            boxes[i] = np.asarray(st.boxes_of(r))
            if st.scores is not None:
                scores[i] = np.asarray(st.scores[st.offsets[r]:st.offsets[r + 1]])
    merged = BoxStore.from_arrays(index.keys, index.sizes, boxes, scores if has_scores else None, method=method,
                                  params=params, normalized=True, top_k=params.get("top_k"))
    merged.meta["validation"] = report.as_dict()   # the counts of the raw boxes, as one run records them
    merged.meta["failures"] = {index.keys[i]: failures[i] for i in sorted(failures)}
    merged.meta["num_failed"] = len(failures)
    merged.meta["skipped_by_scan"] = dict(index.bad)
    merged.save(out)
    if not keep_parts:
        for path in paths:
            path.unlink()
        sp.unlink(missing_ok=True)
    return merged


# ---------------------------------------------------------------------------------------------
# shards in, shards out
# ---------------------------------------------------------------------------------------------
def _decode(data: bytes, size: tuple[int, int], max_side: int, where: str) -> np.ndarray:
    import cv2
    from .common import decode_flag, resize_long_side
    img = cv2.imdecode(np.frombuffer(data, np.uint8), decode_flag(size, max_side))
    if img is None:
        raise ValueError(f"{where}: cannot decode image")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(resize_long_side(img, max_side))


def propose_shards(src: str | os.PathLike, out: str | os.PathLike, job: ProposalJob, part: int | None = None,
                   num_parts: int | None = None, progress: bool = True) -> dict:
    """Proposals for a shard set's images, written as a new shard set (same shards, same image bytes).

    A part takes shards ``part, part + num_parts, ...``; a shard already written (sound) is
    skipped, so a killed part resumes.  Run :func:`finish_shards` once all parts are done.

    Returns:
        ``{"written", "resumed", "images", "failures": {key: why}, "seconds"}``.
    """
    import cv2
    from tqdm import tqdm
    from .. import shards as S
    from .methods import make_detector, propose_image
    part, num_parts = resolve_part(part, num_parts)
    src_set = S.ShardSet.open(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"source": str(src_set.root.resolve()), "source_fingerprint": src_set.manifest["fingerprint"],
            "params": job.params(), "method": job.method}
    plan_path = out / "proposals_job.json"
    if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
        raise ValueError(f"{out} holds shards of another proposals job ({plan_path}); use another folder")
    if not plan_path.exists():
        S._write_text_atomic(plan_path, json.dumps(plan, indent=1, sort_keys=True))
    cv2.setNumThreads(1)
    det = make_detector(job.method, job.model_dir, job.color, job.ss_mode, job.bing_nms_rounds, top_k=job.top_k,
                        nms_iou=job.nms_iou)
    mine = src_set.shards[part::num_parts]
    rep = {"written": 0, "resumed": 0, "images": 0, "failures": {}, "seconds": 0.0}
    t0 = time.perf_counter()
    bar = tqdm(total=sum(s["count"] for s in mine), unit="img", desc=f"proposals {part}/{num_parts}",
               disable=not progress)
    try:
        for s in mine:
            dst = out / s["name"]
            if dst.exists() and not S.check_shard(dst, expect=(s["first"], s["count"])):
                rep["resumed"] += 1
                bar.update(s["count"])
                continue

            def samples(s=s):
                for smp in src_set.samples(s):
                    wh = (smp["width"], smp["height"])
                    try:
                        img = _decode(smp["image"], wh, job.max_side, f"{s['name']}:{smp['key']}")
                        b, sc = propose_image(img, det, job.top_k, job.nms_iou)
                    except Exception as e:  # recorded, never fatal
                        rep["failures"][smp["key"]] = f"{type(e).__name__}: {e}"
                        b, sc = np.zeros((0, 4), np.float32), None
                    # the validation a box store applies (clip, drop degenerate, top k)
                    keep, clipped, _ = validate_boxes(b, np.tile(wh, (len(b), 1)))
                    keep &= np.cumsum(keep) <= job.top_k
                    sc = None if sc is None else np.asarray(sc, np.float32)[keep]
                    rep["images"] += 1
                    bar.update(1)
                    yield dict(smp, boxes=clipped[keep], scores=sc if job.method == "bing" else None)

            S.write_shard(dst, samples())
            rep["written"] += 1
    finally:
        bar.close()
    rep["seconds"] = time.perf_counter() - t0
    return rep


def finish_shards(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write ``shards.json`` of a shard set made by :func:`propose_shards` once every shard is there."""
    from .. import shards as S
    src_set = S.ShardSet.open(src)
    out = Path(out)
    bad = {s["name"]: why for s in src_set.shards
           if (why := S.check_shard(out / s["name"], expect=(s["first"], s["count"])))}
    if bad:
        raise FileNotFoundError(f"{len(bad)} shard(s) of {out} are missing or damaged: "
                                + "; ".join(f"{k}: {v}" for k, v in list(bad.items())[:8]) + "; rerun their parts")
    plan = json.loads((out / "proposals_job.json").read_text())
    manifest = dict(src_set.manifest)
    parts = []
    entries = []
    for s in src_set.shards:
        ss = S.ShardSet(out, {})
        mine = [np.asarray(smp["boxes"]) for smp in ss.samples(s)]
        parts += mine
        entries.append(dict(s, boxes_sha=S.boxes_digest_of({"boxes": b} for b in mine)))
    manifest["shards"] = entries
    flat = np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)
    counts = np.array([len(b) for b in parts], np.int64)
    areas = None
    if len(flat):
        offs = np.concatenate([[0], np.cumsum(counts)])
        areas = {}
        for k in [*range(1, 33), None]:
            take = np.concatenate([np.arange(offs[i], offs[i] + (counts[i] if k is None else min(k, counts[i])))
                                   for i in range(len(counts))]).astype(np.int64)
            b = flat[take].astype(np.float64)
            areas["all" if k is None else str(k)] = float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean())
    manifest["with_scores"] = plan["method"] == "bing"
    manifest["store"] = {"fingerprint": src_set.manifest["fingerprint"], "method": plan["method"],
                         "params": plan["params"], "boxes_sha": S._sha(np.asarray(flat, "<f4").tobytes()),
                         "mean_area_by_top_k": areas}
    S._write_text_atomic(out / S.MANIFEST, json.dumps(manifest, indent=1))
    return manifest
