"""``dali-objcrop merge``: the parts of a multi-process proposals run -> one box store (or shard set)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge the parts of `proposals --part/--num-parts` into one store")
    p.add_argument("source", help="the image folder / COCO .json the parts ran on, or with --shards the source "
                                  "shard set")
    p.add_argument("--out", required=True, help="the --out the parts were given (.boxes, or a shard folder)")
    p.add_argument("--num-parts", type=int, help="how many parts the run had (default: what the parts recorded)")
    p.add_argument("--images", help="image folder of a COCO json (default <json dir>/images)")
    p.add_argument("--block", type=int, default=None, help="images per dealt block (default: what the parts recorded)")
    p.add_argument("--shards", action="store_true", help="proposals were computed from a shard set into --out: "
                                                         "write its shards.json")
    p.add_argument("--keep-parts", action="store_true", help="keep the part stores after merging")
    p.add_argument("--no-check", action="store_true", help="skip the per-file header scan of the image index")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals.distributed import finish_shards, merge_parts
    if args.shards:
        m = finish_shards(args.source, args.out)
        print(f"wrote {args.out}/shards.json: {len(m['shards'])} shards, {m['num_samples']} samples")
        return 0
    from ..proposals.run import load_index
    index = load_index(args.source, args.images, check=not args.no_check)
    store = merge_parts(index, args.out, args.num_parts, block=args.block, keep_parts=args.keep_parts)
    print(f"wrote {args.out}: {store.summary()}")
    return 0


def run_part(args: argparse.Namespace) -> int:
    """``proposals --part``: one part of a multi-process run, or proposals from a shard set into new shards."""
    import sys
    from pathlib import Path
    from ..proposals.distributed import propose_shards, resolve_part, run_part as _run_part
    from ..proposals.run import ProposalJob, load_index
    if args.method == "gt":
        raise SystemExit("--method gt needs no parts (it reads the COCO json)")
    if args.part in (None, "auto"):
        if args.num_parts is not None:
            raise SystemExit("--part auto reads the part and the count from the environment; drop --num-parts")
        part, num = resolve_part(None, None)
    else:
        part, num = resolve_part(int(args.part), args.num_parts)
    job = ProposalJob(method=args.method, top_k=args.top_k, nms_iou=args.nms_iou, max_side=args.max_side,
                      model_dir=args.model_dir, color=args.color, bing_nms_rounds=args.bing_nms_rounds or None)
    if (Path(args.source) / "shards.json").is_file():
        rep = propose_shards(args.source, args.out, job, part, num, progress=not args.no_progress)
        print(f"part {part} of {num}: {rep['written']} shards written, {rep['resumed']} already there, "
              f"{rep['images']} images in {rep['seconds']:.1f} s, {len(rep['failures'])} failed; when every part "
              f"is done: dali-objcrop merge {args.source} --shards --out {args.out}", file=sys.stderr)
        return 0
    index = load_index(args.source, args.images, check=not args.no_check)
    store, rep = _run_part(index, args.out, job, part, num, block=args.block, workers=args.workers,
                           chunk_size=args.chunk_size, restart=args.restart, progress=not args.no_progress,
                           max_chunks=args.max_chunks)
    print(f"part {part} of {num}: {rep.computed} images computed ({rep.rate:.1f} images/s), {rep.resumed} resumed",
          file=sys.stderr)
    if store is None:
        print("stopped early (--max-chunks); rerun the same command to continue", file=sys.stderr)
        return 3
    print(f"part {part} of {num} done; when every part is: dali-objcrop merge {args.source} --out {args.out} "
          f"--num-parts {num}", file=sys.stderr)
    return 0
