"""Pictures of what the cropper does: one row per sample, drawn with OpenCV.

``crop_grid(rows, out_png)`` draws, per sample, the image with all its
proposals (thin), the chosen proposal (thick), both crop windows (labelled
``1`` and ``2``, distinct colours, ``f`` when the view is flipped) and, to the
right, the two resulting crops side by side.  With local (multi-crop) views the
image also carries their windows (thin, a magenta-violet family, lettered
``a``, ``b``, ... and ``f`` when flipped) and, where the row has their crops,
their thumbnails follow the two views.  ``cut_crop`` cuts one window with
OpenCV for tools that do not need DALI.  Both are deterministic: the random
decisions come from :func:`dali_objcrop.windows.sample_windows`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .constants import IMAGENET_MEAN_PX, IMAGENET_STD_PX

# RGB colours (the canvas is RGB until it is written)
PROPOSAL_RGB = (255, 230, 60)     # thin yellow
BOX_RGB = (255, 40, 40)           # thick red: the chosen proposal
WINDOW_RGB = ((40, 170, 255), (60, 230, 90))   # view 1 blue, view 2 green
# local view j: LOCAL_RGB[j % 4], thin; magenta to violet, apart from every colour above
LOCAL_RGB = ((255, 60, 220), (190, 90, 255), (255, 120, 190), (150, 80, 255))
TEXT_RGB = (255, 255, 255)
BG_RGB = (32, 32, 32)


def _size_wh(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        w = h = int(size)
    else:
        w, h = (int(s) for s in size)
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return w, h


def cut_crop(image: np.ndarray, window: Sequence[int], flip: bool = False,
             size: int | Sequence[int] = 224) -> np.ndarray:
    """Cut ``window`` out of ``image``, resize it and optionally mirror it.

    Args:
        image: (H, W, C) or (H, W) uint8 image.
        window: ``[x1, y1, x2, y2)`` integer pixels, inside the image.
        flip: mirror horizontally (after the resize; same pixels either way).
        size: output side, or ``(width, height)``.

    Returns:
        (size_h, size_w[, C]) array of the image's dtype.  Bilinear when
        enlarging, area averaging when shrinking (no aliasing on big windows).
    """
    img = np.asarray(image)
    x1, y1, x2, y2 = (int(v) for v in window)
    h, w = img.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"window {list(window)!r} is empty or outside the {w}x{h} image")
    ow, oh = _size_wh(size)
    patch = img[y1:y2, x1:x2]
    shrink = ow * oh < (x2 - x1) * (y2 - y1)
    out = cv2.resize(patch, (ow, oh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if out.ndim == 2 and img.ndim == 3:  # cv2 drops a single channel
        out = out[..., None]
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def crop_to_uint8(crop: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN_PX,
                  std: Sequence[float] = IMAGENET_STD_PX) -> np.ndarray:
    """Any crop as displayable (H, W, 3) uint8 RGB.

    Args:
        crop: (H, W, C) uint8, or a float crop normalised as ``(x - mean) / std``
            in either HWC or CHW layout (a torch tensor works too).
        mean, std: the normalisation's per-channel constants, in the units of
            the un-normalised pixels (0-255 by default, as DALI's
            ``crop_mirror_normalize`` takes them).

    Returns:
        (H, W, 3) uint8.
    """
    a = crop.detach().cpu().numpy() if hasattr(crop, "detach") else np.asarray(crop)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"crop must be (H, W, C) or (C, H, W), got shape {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):  # CHW -> HWC
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = a.astype(np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def _label(canvas: np.ndarray, text: str, org: tuple[int, int], colour, scale: float = 0.45,
           outline: bool = True) -> None:
    """Text, with a dark outline where it sits on a picture so it reads on any background."""
    if outline:
        cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _rect(canvas: np.ndarray, r: Sequence[float], s: float, colour, thickness: int) -> tuple[int, int, int, int]:
    # window [x1, x2) -> last pixel x2 - 1, scaled to the panel
    x1, y1 = int(round(r[0] * s)), int(round(r[1] * s))
    x2, y2 = int(round(r[2] * s)) - 1, int(round(r[3] * s)) - 1
    cv2.rectangle(canvas, (x1, y1), (max(x1, x2), max(y1, y2)), colour, thickness, cv2.LINE_AA)
    return x1, y1, x2, y2


def local_name(j: int) -> str:
    """The letter of local view ``j`` (``a``, ``b``, ...)."""
    return chr(ord("a") + j)


def draw_sample(image: np.ndarray, proposals: np.ndarray | None, box: np.ndarray | None,
                windows: np.ndarray, flips: Sequence[bool] = (False, False), height: int = 256,
                local_windows: np.ndarray | None = None, local_flips: Sequence[bool] | None = None) -> np.ndarray:
    """The image scaled to ``height`` with proposals, chosen box and both windows drawn on it.

    Args:
        image: (H, W, 3) uint8 RGB.
        proposals: (k, 4) pixel boxes ``[x1, y1, x2, y2]`` (thin), or None.
        box: (4,) chosen proposal in pixels (thick), NaN or None when there is none.
        windows: (2, 4) int ``[x1, y1, x2, y2)`` of views 1 and 2.
        flips: per view, drawn as ``f`` after the view number.
        height: panel height in pixels.
        local_windows: (M, 4) int windows of the local views (1 px, :data:`LOCAL_RGB`, lettered at
            their top-left corner), or None.
        local_flips: (M,) per local view, ``f`` after its letter.

    Returns:
        (height, round(W * height / H), 3) uint8 RGB.
    """
    img = crop_to_uint8(image)
    h, w = img.shape[:2]
    s = height / h
    pw = max(1, int(round(w * s)))
    panel = cv2.resize(img, (pw, height), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if proposals is not None:
        for p in np.asarray(proposals, np.float64).reshape(-1, 4):
            _rect(panel, p, s, PROPOSAL_RGB, 1)
    if box is not None and np.all(np.isfinite(np.asarray(box, np.float64))):
        _rect(panel, box, s, BOX_RGB, 3)
    if local_windows is not None and len(local_windows):
        # under the global windows (drawn next), so the two views stay readable over many local ones
        lw = np.asarray(local_windows).reshape(-1, 4)
        lf = np.zeros(len(lw), bool) if local_flips is None else np.asarray(local_flips, bool)
        corners = [_rect(panel, w, s, LOCAL_RGB[j % len(LOCAL_RGB)], 1) for j, w in enumerate(lw)]
        for j, (x1, y1, _, _) in enumerate(corners):
            _label(panel, f"{local_name(j)}{'f' if lf[j] else ''}", (x1 + 2, y1 + 11), LOCAL_RGB[j % len(LOCAL_RGB)],
                   0.38)
    win = np.asarray(windows).reshape(2, 4)
    # view 2 thick underneath, view 1 thin on top: both stay visible when the windows coincide
    corners = {v: _rect(panel, win[v], s, WINDOW_RGB[v], 4 if v else 2) for v in (1, 0)}
    for v in (0, 1):
        x1, y1, x2, y2 = corners[v]
        text = f"{v + 1}{'f' if flips[v] else ''}"
        # view 1 labelled at its top-left corner, view 2 at its bottom-right, so they never sit on each other
        org = (x1 + 3, y1 + 14) if v == 0 else (max(0, x2 - 9 * len(text) - 3), max(12, y2 - 4))
        _label(panel, text, org, WINDOW_RGB[v], 0.5)
    return panel


_TITLE_PAD = 18    # title strip above each panel
_HEADER_PAD = 22   # title + legend strip above each row


def _titled(panel: np.ndarray, title: str, colour=TEXT_RGB, pad: int = _TITLE_PAD, scale: float = 0.42) -> np.ndarray:
    """``panel`` under a dark strip holding ``title`` (text longer than the panel is cut at its edge)."""
    out = np.full((panel.shape[0] + pad, panel.shape[1], 3), BG_RGB, np.uint8)
    out[pad:] = panel
    _label(out, title, (3, pad - 5), colour, scale, outline=False)
    return out


def _local_panel(crops: Sequence, flips: Sequence[bool], height: int, mean, std, gap: int = 4
                 ) -> tuple[np.ndarray, list[list[int]]]:
    """The local views' thumbnails tiled in one or two rows of square tiles, ``height`` tall, each framed
    in its colour and lettered; also each tile's ``[x, y, w, h]`` in the panel."""
    m = len(crops)
    rows = 1 if m <= 2 else 2
    cols = -(-m // rows)
    t = max(1, (height - (rows - 1) * gap) // rows)
    panel = np.full((height, cols * t + (cols - 1) * gap, 3), BG_RGB, np.uint8)
    tiles = []
    for j, crop in enumerate(crops):
        c = crop_to_uint8(crop, mean, std)
        c = cv2.resize(c, (t, t), interpolation=cv2.INTER_AREA if max(c.shape[:2]) > t else cv2.INTER_LINEAR)
        colour = LOCAL_RGB[j % len(LOCAL_RGB)]
        cv2.rectangle(c, (0, 0), (t - 1, t - 1), colour, 2)
        _label(c, f"{local_name(j)}{'f' if flips[j] else ''}", (4, 14), colour, 0.42)
        x, y = (j % cols) * (t + gap), (j // cols) * (t + gap)
        panel[y:y + t, x:x + t] = c
        tiles.append([x, y, t, t])
    return panel, tiles


def render_row(row: dict, height: int = 256, gap: int = 6, mean: Sequence[float] = IMAGENET_MEAN_PX,
               std: Sequence[float] = IMAGENET_STD_PX, layout: list[dict] | None = None) -> np.ndarray:
    """One grid row (see :func:`crop_grid` for the keys of ``row``), (H, W, 3) uint8 RGB.

    ``layout``, when given, receives one dict per panel (``name`` "image", "view1", "view2", then
    "local" where the row has local crops, and the picture's ``x``, ``y``, ``w``, ``h`` inside the
    returned row, title strips excluded; "local" also has its thumbnails' ``tiles``, ``[x, y, w, h]``
    each in the same coordinates)."""
    for k in ("image", "windows", "crops"):
        if k not in row:
            raise ValueError(f"a crop_grid row needs key {k!r}, got keys {sorted(row)}")
    flips = tuple(bool(f) for f in row.get("flips", (False, False)))
    win = np.asarray(row["windows"]).reshape(2, 4)
    ih, iw = np.asarray(row["image"]).shape[:2]
    lw = row.get("local_windows")
    m = 0 if lw is None else len(lw)
    lflips = tuple(bool(f) for f in row.get("local_flips", np.zeros(m, bool)))
    panels = [_titled(draw_sample(row["image"], row.get("proposals"), row.get("box"), row["windows"], flips,
                                  height, lw if m else None, lflips), f"image {iw}x{ih}px")]
    for v, crop in enumerate(row["crops"][:2]):
        c = crop_to_uint8(crop, mean, std)
        c = cv2.resize(c, (int(round(c.shape[1] * height / c.shape[0])), height), interpolation=cv2.INTER_AREA
                       if c.shape[0] > height else cv2.INTER_LINEAR)
        cv2.rectangle(c, (0, 0), (c.shape[1] - 1, c.shape[0] - 1), WINDOW_RGB[v], 3)
        x1, y1, x2, y2 = (int(t) for t in win[v])
        panels.append(_titled(c, f"view {v + 1}{' flipped' if flips[v] else ''}  {x2 - x1}x{y2 - y1}px",
                              WINDOW_RGB[v]))
    names = ["image", "view1", "view2"]
    tiles: list[list[int]] = []
    local_crops = row.get("local_crops")
    if local_crops is not None and len(local_crops):
        if len(local_crops) != m:
            raise ValueError(f"a crop_grid row has {len(local_crops)} local crops and {m} local windows")
        pic, tiles = _local_panel(local_crops, lflips, height, mean, std)
        size = row.get("local_size")
        panels.append(_titled(pic, f"{m} local views{f'  {size}px' if size else ''}"
                                   f"{'  from ' + row['local_from'] if row.get('local_from') else ''}",
                              LOCAL_RGB[0]))
        names.append("local")
    hh = max(p.shape[0] for p in panels)
    sep = np.full((hh, gap, 3), BG_RGB, np.uint8)
    if layout is not None:
        x = 0
        for name, p in zip(names, panels):
            # the picture sits under its title strip (_titled) and the row's header strip (_header)
            y = _HEADER_PAD + _TITLE_PAD
            layout.append({"name": name, "x": x, "y": y, "w": int(p.shape[1]), "h": int(p.shape[0]) - _TITLE_PAD})
            if name == "local":
                layout[-1]["tiles"] = [[x + tx, y + ty, tw, th] for tx, ty, tw, th in tiles]
            x += p.shape[1] + gap
    parts = []
    for p in panels:
        if p.shape[0] < hh:
            p = np.concatenate([p, np.full((hh - p.shape[0], p.shape[1], 3), BG_RGB, np.uint8)])
        parts += [p, sep]
    body = np.concatenate(parts[:-1], axis=1)
    return _header(body, row.get("title") or _default_title(row), local=m)


def _header(body: np.ndarray, title: str, pad: int = _HEADER_PAD, scale: float = 0.5, local: int = 0) -> np.ndarray:
    """``body`` under a strip: the title, then a colour legend (as far as the width allows)."""
    out = np.full((body.shape[0] + pad, body.shape[1], 3), BG_RGB, np.uint8)
    out[pad:] = body
    x = 3
    pieces = [(title + "   ", TEXT_RGB), ("proposals ", PROPOSAL_RGB), ("chosen ", BOX_RGB),
              ("window 1 ", WINDOW_RGB[0]), ("window 2 ", WINDOW_RGB[1]), ("(f = flipped)", TEXT_RGB)]
    if local:
        pieces.insert(-1, (f"local a{'-' + local_name(local - 1) if local > 1 else ''} ", LOCAL_RGB[0]))
    for k, (text, colour) in enumerate(pieces):
        tw = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
        if k and x + tw > out.shape[1]:  # a legend word that does not fit is left out, never cut
            break
        _label(out, text, (x, pad - 6), colour, scale, outline=False)
        x += tw
    return out


def _default_title(row: dict) -> str:
    bits = [str(row[k]) for k in ("key", "mode") if row.get(k) is not None]
    return "  ".join(bits) or "sample"


def crop_grid(rows: Sequence[dict], out_png: str | os.PathLike | None = None, height: int = 256, gap: int = 6,
              mean: Sequence[float] = IMAGENET_MEAN_PX, std: Sequence[float] = IMAGENET_STD_PX,
              layout: list[dict] | None = None) -> np.ndarray:
    """Draw one row per sample and write the grid as a PNG.

    Args:
        rows: one dict per sample with
            ``image`` (H, W, 3) uint8 RGB;
            ``windows`` (2, 4) int ``[x1, y1, x2, y2)`` of the two views;
            ``crops``: the two crops, (h, w, 3) uint8 or float normalised
            ``(x - mean) / std`` in HWC or CHW layout;
            optional ``proposals`` (k, 4) pixel boxes, ``box`` (4,) the chosen
            proposal in pixels (NaN for none), ``flips`` (2,) bool, and
            ``title`` or ``key`` / ``mode`` for the row's title;
            optional local views: ``local_windows`` (M, 4) int and
            ``local_flips`` (M,) bool (drawn on the image), ``local_crops``
            (M crops, as ``crops``; their thumbnails follow the two views),
            ``local_size`` and ``local_from`` (for the panel's title).
        out_png: where to write the PNG (parent folders are created); None
            only returns the picture.
        height: height of every panel in pixels.
        gap: pixels between panels and rows.
        mean, std: normalisation constants of float crops (see :func:`crop_to_uint8`).
        layout: if a list, one dict per row is appended: the row's ``y`` and ``h`` in the grid and
            its ``panels`` (``name``, ``x``, ``y``, ``w``, ``h`` of the image and of both views'
            pictures, and of the local thumbnails with their ``tiles``, in grid pixels), so a caller
            can say what the picture shows.

    Returns:
        The grid, (H, W, 3) uint8 RGB.
    """
    if len(rows) == 0:
        raise ValueError("crop_grid needs at least one row")
    if height < 32:
        raise ValueError(f"height must be >= 32 pixels, got {height}")
    panels: list[list[dict]] = [[] for _ in rows]
    drawn = [render_row(r, height, gap, mean, std, p) for r, p in zip(rows, panels)]
    width = max(d.shape[1] for d in drawn)
    blocks = []
    y = 0
    for d, p in zip(drawn, panels):
        if layout is not None:
            layout.append({"y": y, "h": int(d.shape[0]), "panels": [
                {**q, "y": q["y"] + y, **({"tiles": [[tx, ty + y, tw, th] for tx, ty, tw, th in q["tiles"]]}
                                          if "tiles" in q else {})} for q in p]})
        y += d.shape[0] + gap
        if d.shape[1] < width:  # rows of portrait images are narrower
            d = np.concatenate([d, np.full((d.shape[0], width - d.shape[1], 3), BG_RGB, np.uint8)], axis=1)
        blocks += [d, np.full((gap, width, 3), BG_RGB, np.uint8)]
    grid = np.concatenate(blocks[:-1], axis=0)
    if out_png is not None:
        out = Path(out_png)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {out}")
    return grid
