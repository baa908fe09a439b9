"""Command-line front ends of the proposals package (registered in ``dali_objcrop.cli``):

* ``dali-objcrop proposals IMAGES_DIR_OR_COCO_JSON --out STORE [--method bing] [--workers N]``
* ``dali-objcrop eval-proposals STORE --coco ANN [--json OUT]``
* ``dali-objcrop train-bing --coco ANN --images DIR --out MODEL_DIR``
* ``dali-objcrop fetch-model bing [--cache-dir DIR]``

Each ``add_*`` function registers one subcommand; the modules that do the work
(``run``, ``evaluate``, ``train_bing``, ``fetch``) expose them as their ``add_parser``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


# ---- proposals ------------------------------------------------------------------------------
def add_proposals(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proposals", help="compute object proposals for a dataset into a box store (resumable)")
    p.add_argument("source", help="an image folder, or a COCO .json (images in --images or <json dir>/images)")
    p.add_argument("--out", required=True, help="box store to write (.boxes); partial results go to <out>.parts/")
    p.add_argument("--method", default="bing", choices=["bing", "bing-opencv", "gt", "selective-search"],
                   help="bing: our fast BING (default); bing-opencv: cv2.saliency reference; gt: COCO boxes")
    p.add_argument("--images", help="image folder of a COCO json (default <json dir>/images)")
    p.add_argument("--top-k", type=int, default=10, help="proposals kept per image (default 10)")
    p.add_argument("--nms-iou", type=float, default=0.5,
                   help="IoU above which a lower-ranked proposal is dropped, across sizes (default 0.5; 1 = off)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=64, help="images per resumable chunk (default 64)")
    p.add_argument("--model-dir", help="BING model folder (default: the model shipped with the package)")
    p.add_argument("--color", default="MAXBGR", choices=["MAXBGR", "HSV", "I"], help="BING colour model")
    p.add_argument("--bing-nms-rounds", type=int, default=0,
                   help="0 (default): exact, OpenCV's boxes (lazy top k); N: cap our BING's per-size NMS at N "
                        "parallel rounds (an approximation)")
    p.add_argument("--max-side", type=int, default=512, help="long side the method sees (default 512)")
    p.add_argument("--restart", action="store_true", help="discard partial results of an earlier run")
    p.add_argument("--no-check", action="store_true", help="skip the per-file header scan of the image index")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (rerun to go on)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept COCO file_name entries that are absolute or climb out of the image folder (refused "
                        "by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_proposals_cmd)


def run_proposals_cmd(args: argparse.Namespace) -> int:
    from ..boxstore import BoxStore
    from ..dataset import check_keys
    from .run import JobLock, ProposalJob, load_index, run_proposals
    if args.method == "gt":
        if not str(args.source).endswith(".json"):
            raise SystemExit("--method gt needs a COCO .json source")
        store = BoxStore.from_coco(args.source, top_k=args.top_k)
        # the images are not read here, but the loader will read these keys later: refuse them now
        check_keys(list(store.keys), args.images or Path(args.source).parent, args.allow_outside_root)
        with JobLock(Path(args.out)):
            store.save(args.out)
        print(f"wrote {args.out}: {store.summary()}")
        return 0
    index = load_index(args.source, args.images, check=not args.no_check, allow_outside_root=args.allow_outside_root)
    job = ProposalJob(method=args.method, top_k=args.top_k, nms_iou=args.nms_iou, max_side=args.max_side,
                      model_dir=args.model_dir, color=args.color,
                      bing_nms_rounds=args.bing_nms_rounds or None)
    store, rep = run_proposals(index, args.out, job, workers=args.workers, chunk_size=args.chunk_size,
                               restart=args.restart, progress=not args.no_progress, max_chunks=args.max_chunks)
    print(f"{rep.computed} images computed ({rep.rate:.1f} images/s), {rep.resumed} resumed from earlier chunks, "
          f"{rep.skipped_by_scan} skipped by the index scan", file=sys.stderr)
    if store is None:
        print(f"stopped early after --max-chunks {args.max_chunks}; rerun the same command to continue",
              file=sys.stderr)
        return 3
    for key, why in list(rep.failures.items())[:10]:
        print(f"  failed: {key}: {why}", file=sys.stderr)
    for key, why in list(store.meta["skipped_by_scan"].items())[:10]:
        print(f"  skipped: {key}: {why}", file=sys.stderr)
    print(f"wrote {args.out}: {store.summary()}; {rep.failed} failed")
    return 0


# ---- eval-proposals -------------------------------------------------------------------------
def add_eval_proposals(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-proposals", help="recall@{1,5,10} at IoU {0.5,0.7} of a box store against COCO boxes")
    p.add_argument("store", help="box store (.boxes)")
    p.add_argument("--coco", required=True, help="COCO annotation JSON (file_name = store keys)")
    p.add_argument("--top-k", type=int, default=None, help="count only each image's first k proposals")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run_eval_cmd)


def run_eval_cmd(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_store
    res = evaluate_store(args.store, args.coco, top_k=args.top_k)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


# ---- train-bing -----------------------------------------------------------------------------
def add_train_bing(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-bing", help="train a BING model (two-stage linear SVMs) on COCO-format boxes")
    p.add_argument("--coco", required=True, help="COCO annotation JSON")
    p.add_argument("--images", help="its image folder (default <json dir>/images)")
    p.add_argument("--out", required=True, help="model folder to write (ObjNessB2W8<color>.*.yml.gz)")
    p.add_argument("--color", default="MAXBGR", choices=["MAXBGR", "HSV", "I"])
    p.add_argument("--max-images", type=int, default=None, help="use the first N images")
    p.add_argument("--negatives-per-image", type=int, default=100)
    p.add_argument("--min-size-count", type=int, default=50, help="positives a size needs to be active")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept file_name entries that are absolute or climb out of the image folder")
    p.set_defaults(func=run_train_cmd)


def run_train_cmd(args: argparse.Namespace) -> int:
    from .train_bing import TrainConfig, train_bing
    cfg = TrainConfig(color=args.color, max_images=args.max_images, negatives_per_image=args.negatives_per_image,
                      min_size_count=args.min_size_count, seed=args.seed)
    train_bing(args.coco, args.images, args.out, cfg, allow_outside_root=args.allow_outside_root)
    return 0


# ---- fetch-model ----------------------------------------------------------------------------
def add_fetch_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download OpenCV's pretrained BING files (pinned URL + sha256)")
    p.add_argument("name", choices=["bing"], help="which model (only 'bing')")
    p.add_argument("--cache-dir", help="destination (default $DALI_OBJCROP_HOME/models/bing-opencv)")
    p.add_argument("--colors", default="MAXBGR,HSV,I", help="comma-separated colour models (default all three)")
    p.add_argument("--base-url", help="alternative location of the files (a mirror)")
    p.set_defaults(func=run_fetch_cmd)


def run_fetch_cmd(args: argparse.Namespace) -> int:
    from .fetch import FetchError, fetch_bing
    try:
        d = fetch_bing(args.cache_dir, tuple(c.strip() for c in args.colors.split(",")), args.base_url)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(d)
    return 0
