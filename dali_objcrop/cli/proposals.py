"""``dali-objcrop proposals``: object proposals of a dataset into a box store (resumable, multi-process)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proposals", help="compute object proposals for a dataset into a box store (resumable)")
    p.add_argument("source", help="an image folder, or a COCO .json (images in --images or <json dir>/images)")
    p.add_argument("--out", required=True, help="box store to write (.boxes); partial results go to <out>.parts/")
    p.add_argument("--method", default="bing", choices=["bing", "bing-opencv", "gt", "selective-search"],
                   help="bing: our fast BING (default); bing-opencv: cv2.saliency reference; gt: COCO boxes")
    p.add_argument("--images", help="image folder of a COCO json (default: images/ beside the json or beside its "
                                    "folder)")
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
    # several machines / processes (dali_objcrop.proposals.distributed), then `dali-objcrop merge`
    p.add_argument("--part", default=None, help="compute only this part: a number (with --num-parts), or 'auto' "
                                                "(SLURM_ARRAY_TASK_ID of _COUNT, else torchrun's RANK of WORLD_SIZE)")
    p.add_argument("--num-parts", type=int, default=None, help="how many parts the image list is cut into")
    p.add_argument("--block", type=int, default=64, help="images per block dealt round-robin to parts (default 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.part is not None or _is_shard_set(args.source):
        from .merge import run_part
        return run_part(args)
    from ..boxstore import BoxStore
    from ..dataset import check_keys
    from ..proposals.run import ProposalJob, load_index, output_lock, run_proposals
    if args.method == "gt":
        if not str(args.source).endswith(".json"):
            raise SystemExit("--method gt needs a COCO .json source")
        store = BoxStore.from_coco(args.source, top_k=args.top_k)
        # the images are not read here, but the loader will read these keys later: refuse them now
        check_keys(list(store.keys), args.images or Path(args.source).parent, args.allow_outside_root)
        with output_lock(Path(args.out)):
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


def _is_shard_set(source: str) -> bool:
    from pathlib import Path
    return (Path(source) / "shards.json").is_file()
