"""Glue of the ``show`` and ``crop-stats`` tools: dataset + box store -> windows -> picture / figures.

Windows always come from :func:`dali_objcrop.windows.sample_windows` keyed by
``(seed, epoch, dataset position)``, exactly as the loader keys them, with the
box-crop scale derived from the store's mean proposal area, so what these tools
draw and measure is what training sees.  No DALI needed: crops are cut with
OpenCV (:func:`dali_objcrop.visualize.cut_crop`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .boxstore import BoxStore
from .dataset import ImageIndex
from .windows import LOCAL_SOURCES, MODES, CropConfig, CropWindows, box_scale_from_mean_area, sample_windows


@dataclass
class ToolData:
    """An image index with its proposals and ground-truth boxes aligned to it.

    Attributes:
        index: the images (dataset order = sample index).
        store: the proposals (a box store, or the ground truth).
        rows: (N,) store row of each image.
        gt_boxes: (M, 4) ground-truth boxes in float pixels, largest first.
        gt_offsets: (N + 1,) int64 into ``gt_boxes``.
    """

    index: ImageIndex
    store: BoxStore
    rows: np.ndarray
    gt_boxes: np.ndarray
    gt_offsets: np.ndarray


def load_tool_data(coco: str | os.PathLike, images: str | os.PathLike | None = None,
                   boxes: str | os.PathLike | None = None, check: bool = False,
                   allow_outside_root: bool = False) -> ToolData:
    """Read a COCO JSON, its image folder and (optionally) a box store.

    Args:
        coco: COCO-format annotations (the ground truth, and the image list).
        images: image folder (default: ``images/`` beside the JSON).
        boxes: a ``.boxes`` store; None uses the ground-truth boxes as proposals.
        check: scan image headers and drop broken files (slower; ``show`` reads
            the pixels anyway).
        allow_outside_root: accept ``file_name`` entries outside the image folder.
    """
    from .index import index_of
    index, _ = index_of(os.fspath(coco), images, allow_outside_root, check=check)
    if len(index) == 0:
        raise ValueError(f"no usable images in {coco}")
    gt = BoxStore.from_coco(coco)
    gt_rows = gt.rows_for(index.keys, index.sizes)
    gb, go = gt.gather(gt_rows)
    wh = index.sizes.astype(np.float64)
    owner = np.repeat(np.arange(len(index)), np.diff(go))
    gt_px = np.asarray(gb, np.float64) * np.concatenate([wh, wh], axis=1)[owner]
    store = gt if boxes is None else BoxStore.load(boxes)
    rows = gt_rows if boxes is None else store.rows_for(index.keys, index.sizes)
    return ToolData(index=index, store=store, rows=rows, gt_boxes=gt_px, gt_offsets=go)


def crop_config(store: BoxStore, mode: str, top_k: int = CropConfig.top_k, dilate: float = CropConfig.dilate,
                shift_range: tuple[float, float] = CropConfig.shift_range, min_box_size: int = CropConfig.min_box_size,
                box_scale: tuple[float, float] | None = None, local_crops: int = 0,
                local_from: str | None = None, local_size: int = CropConfig.local_size,
                local_scale: tuple[float, float] = CropConfig.local_scale) -> CropConfig:
    """The loader's crop configuration: box-crop scale from the store's mean top-k proposal area
    (``box_scale`` overrides it, e.g. to try the paper's COCO BING value (0.51, 1) with other boxes).

    ``local_crops`` local views drawn from ``local_from`` (None: ``box``, or ``scene`` for
    ``scene-scene``, which has no proposal to draw them in)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if box_scale is None and store.num_boxes:
        box_scale = box_scale_from_mean_area(store.mean_area_fraction(top_k))
    if local_from is None:
        local_from = "scene" if mode == "scene-scene" else "box"
    return CropConfig(mode=mode, box_scale=box_scale, dilate=dilate, shift_range=shift_range,
                      min_box_size=min_box_size, top_k=top_k, local_crops=local_crops, local_from=local_from,
                      local_size=local_size, local_scale=tuple(local_scale))


def windows_for(data: ToolData, positions: np.ndarray, config: CropConfig, seed: int, epoch: int
                ) -> CropWindows:
    """Windows of dataset ``positions`` at ``(seed, epoch)`` (the loader's keys)."""
    positions = np.asarray(positions, dtype=np.int64)
    b, off = data.store.gather(data.rows[positions], config.top_k)
    return sample_windows(data.index.sizes[positions], b, off, positions, seed, epoch, config)


def show_rows(data: ToolData, positions: np.ndarray, config: CropConfig, seed: int = 0, epoch: int = 0,
              size: int = 224) -> list[dict]:
    """Rows for :func:`dali_objcrop.visualize.crop_grid`: decoded images, proposals, windows, crops."""
    import cv2

    from .proposals.common import decode_bgr
    from .visualize import cut_crop
    positions = np.asarray(positions, dtype=np.int64)
    cw = windows_for(data, positions, config, seed, epoch)
    b, off = data.store.gather(data.rows[positions], config.top_k)
    out = []
    for j, p in enumerate(positions):
        path = os.path.join(str(data.index.root), data.index.keys[p])
        img = cv2.cvtColor(decode_bgr(path), cv2.COLOR_BGR2RGB)  # stored grid, as the loader
        w, h = data.index.sizes[p]
        if img.shape[:2] != (h, w):
            raise ValueError(f"{path} is {img.shape[1]}x{img.shape[0]}, the annotations say {w}x{h}")
        props = np.asarray(b[off[j]:off[j + 1]], np.float64) * np.array([w, h, w, h], np.float64)
        crops = [cut_crop(img, cw.windows[j, v], bool(cw.flip[j, v]), size) for v in (0, 1)]
        note = "  (no proposal: scene fallback)" if cw.fallback[j] else ""
        row = {"image": img, "proposals": props, "box": cw.box[j], "windows": cw.windows[j],
               "flips": cw.flip[j], "crops": crops, "key": data.index.keys[p], "mode": config.mode,
               "title": f"#{p} {data.index.keys[p]}  {config.mode}  seed {seed} epoch {epoch}{note}"}
        if cw.num_local:
            row.update(local_rows(cw, j, config))
            row["local_crops"] = [cut_crop(img, cw.local_windows[j, i], bool(cw.local_flip[j, i]), config.local_size)
                                  for i in range(cw.num_local)]
        out.append(row)
    return out


def local_rows(cw: CropWindows, j: int, config: CropConfig) -> dict:
    """The local-view keys of a :func:`~dali_objcrop.visualize.crop_grid` row for batch row ``j``
    (empty without local views): windows, flips, source and output size."""
    if not cw.num_local:
        return {}
    return {"local_windows": cw.local_windows[j], "local_flips": cw.local_flip[j],
            "local_from": config.local_from, "local_size": config.local_size}


def loader_local_kwargs(loader_cls, config: CropConfig) -> dict:
    """The local-view arguments of ``config`` that ``loader_cls`` accepts (none, where its constructor
    does not take ``local_crops`` yet, or without local views)."""
    import inspect
    if not config.local_crops:
        return {}
    params = inspect.signature(loader_cls).parameters
    if "local_crops" not in params:
        return {}
    names = ("local_crops", "local_from", "local_size", "local_scale")
    return {k: getattr(config, k) for k in names if k in params}


def loader_windows(loader, index: np.ndarray, epoch: int, local: CropConfig | None = None) -> CropWindows:
    """A loader's windows of dataset positions ``index`` at ``epoch``, with local views.

    Where the loader itself samples local views (its ``config.local_crops``), they are its own;
    otherwise, with ``local`` (a config holding ``local_crops`` and ``local_from``), they are sampled
    from the loader's keys, sizes and proposals with the loader's config plus those fields: the two
    global windows stay the loader's (local views have their own random slots)."""
    from dataclasses import replace
    index = np.atleast_1d(np.asarray(index, dtype=np.int64))
    cfg = loader.config
    if cfg.local_crops or local is None or not local.local_crops:
        return loader.windows_for(index, epoch)
    cfg = replace(cfg, local_crops=local.local_crops, local_from=local.local_from, local_size=local.local_size,
                  local_scale=local.local_scale)
    if loader.store is None:
        boxes, offsets = np.zeros((0, 4), np.float32), np.zeros(len(index) + 1, np.int64)
    else:
        boxes, offsets = loader.store.gather(loader.store_rows[index], cfg.top_k)
    return sample_windows(np.asarray(loader.index.sizes)[index], boxes, offsets, index, loader.seed, epoch, cfg)


def local_crops_of(batch: dict, j: int, m: int) -> list | None:
    """Batch row ``j``'s local views as the loader delivered them (``batch["local"]``, (B, M, C, s, s)),
    or None where the batch carries none (or not the ``m`` expected)."""
    if "local" not in batch:
        return None
    views = batch["local"][j]
    if len(views) != m:
        return None
    return [v.float().cpu() if hasattr(v, "float") else np.asarray(v) for v in views]


def local_sources_for(mode: str, sources=LOCAL_SOURCES) -> tuple[tuple[str, ...], dict[str, str]]:
    """The local sources a mode can draw from, and a reason per source it cannot (``scene-scene`` has no
    proposal to draw ``box`` or ``boxes`` local views in)."""
    bad = [s for s in sources if s not in LOCAL_SOURCES]
    if bad:
        raise ValueError(f"local sources must be among {LOCAL_SOURCES}, got {bad}")
    if mode != "scene-scene":
        return tuple(sources), {}
    return (tuple(s for s in sources if s == "scene"),
            {s: "mode scene-scene draws no proposal to put local views in" for s in sources if s != "scene"})


def crop_stats(data: ToolData, config: CropConfig, samples: int, seed: int = 0, batch: int = 65536,
               local_sources=None) -> dict:
    """Appendix-D figures of ``config`` over ``samples`` draws.

    Sample ``s`` is dataset position ``s % N`` at epoch ``s // N``: every image
    is used equally often, every mode sees the same images and keys, so figures
    of different modes are comparable.

    With local views (``config.local_crops`` > 0) their figures are measured per
    local source in ``local_sources`` (default: ``config.local_from`` alone), all on
    the same samples and global windows (local views have their own random slots,
    so the global windows, and every global figure, do not depend on them).  Like
    the global figures they count ground-truth boxes as the objects, whatever
    proposals the windows were conditioned on.

    Returns:
        :func:`dali_objcrop.stats.summarize`'s figures plus ``mode``, ``fallback``
        (samples that wanted a proposal and got a scene crop) and the config; with
        local views also ``local``: ``crops``, ``scale`` and per source
        :func:`dali_objcrop.stats.summarize_local`'s figures (``sources``), and the
        sources the mode cannot use with the reason (``sources_skipped``).
    """
    from dataclasses import replace

    from .stats import local_per_sample_stats, per_sample_stats, summarize, summarize_local
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    n = len(data.index)
    m_local = config.local_crops
    if m_local:
        sources, skipped = local_sources_for(config.mode, (config.local_from,) if local_sources is None
                                             else tuple(local_sources))
    else:
        sources, skipped = (), {}
    configs = {src: replace(config, local_from=src) for src in sources}
    glob = replace(config, local_crops=0)
    parts: list[dict] = []
    local_parts: dict[str, list[dict]] = {src: [] for src in sources}
    fallback = 0
    for s0 in range(0, samples, batch):
        s = np.arange(s0, min(samples, s0 + batch))
        pos, ep = s % n, s // n
        wins = np.empty((len(s), 2, 4), np.int32)
        local = {src: np.empty((len(s), m_local, 4), np.int32) for src in sources}
        for e in np.unique(ep):  # windows are keyed per epoch
            m = ep == e
            cw = windows_for(data, pos[m], glob, seed, int(e))
            wins[m] = cw.windows
            fallback += cw.num_fallback
            for src, cfg in configs.items():
                lw = windows_for(data, pos[m], cfg, seed, int(e))
                if not np.array_equal(lw.windows, cw.windows):
                    raise AssertionError(f"local views from {src!r} changed the global windows")
                local[src][m] = lw.local_windows
        parts.append(per_sample_stats(data.index.sizes, data.gt_boxes, data.gt_offsets, pos, wins))
        for src in sources:
            local_parts[src].append(local_per_sample_stats(data.index.sizes, data.gt_boxes, data.gt_offsets, pos,
                                                           wins, local[src]))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = {"mode": config.mode, **summarize(merged), "fallback": int(fallback)}
    out["config"] = {"top_k": config.top_k, "box_scale": list(config.box_scale or (1.0, 1.0)),
                     "dilate": config.dilate, "shift_range": list(config.shift_range),
                     "min_box_size": config.min_box_size, "seed": seed, "images": n}
    if m_local:
        figures = {}
        for src, ps in local_parts.items():
            figures[src] = summarize_local({k: np.concatenate([p[k] for p in ps]) for k in ps[0]})
        out["local"] = {"crops": m_local, "scale": list(config.local_scale), "sources": figures,
                        "sources_skipped": skipped}
    return out


def show_rows_from_loader(loader, data: ToolData, n: int, epoch: int = 0, local: CropConfig | None = None
                          ) -> list[dict]:
    """Rows for :func:`~dali_objcrop.visualize.crop_grid` from the first batch an
    :class:`~dali_objcrop.ObjCropLoader` delivers at ``epoch``: the DALI crops (augmented and
    normalised) beside the loader's own windows, to check by eye that the pipeline cuts what the
    windows say.

    Args:
        loader: an ``ObjCropLoader`` with ``batch_size >= n``.
        data: the same dataset (for the proposals drawn).
        n: rows wanted.
        epoch: the epoch to draw.
        local: a config with local views to draw (see :func:`loader_windows`); their thumbnails are
            drawn where the batch carries them (``batch["local"]``).
    """
    import cv2

    from .proposals.common import decode_bgr
    loader.set_epoch(epoch)
    it = iter(loader)
    batch = next(it)
    it.close()  # stop the epoch here; the loader drains on its next iteration
    idx = batch["index"].cpu().numpy()[:n]
    cw = loader_windows(loader, idx, epoch, local)
    local_cfg = local if cw.num_local and not loader.config.local_crops else loader.config
    top_k = loader.config.top_k
    out = []
    for j, p in enumerate(idx):
        key = loader.key_of(p)
        path = os.path.join(str(loader.index.root), key)
        img = cv2.cvtColor(decode_bgr(path), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        props = np.asarray(data.store.boxes_of(data.store.row_of(key))[:top_k], np.float64) * np.array([w, h, w, h])
        crops = [batch[v][j].float().cpu().numpy() for v in ("view1", "view2")]
        row = {"image": img, "proposals": props, "box": cw.box[j], "windows": cw.windows[j],
               "flips": cw.flip[j], "crops": crops, "key": key, "mode": loader.mode,
               "title": f"#{p} {key}  {loader.mode}  DALI {loader.device} seed {loader.seed} epoch {epoch}"}
        row.update(local_rows(cw, j, local_cfg))
        thumbs = local_crops_of(batch, j, cw.num_local) if cw.num_local else None
        if thumbs is not None:   # the loader's own local views, once it delivers them
            row["local_crops"] = thumbs
        out.append(row)
    return out
