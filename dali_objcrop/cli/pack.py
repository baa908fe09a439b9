"""``dali-objcrop pack``: an image folder or COCO json + a box store -> WebDataset shards."""
from __future__ import annotations

import argparse
import sys


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack images + their boxes into WebDataset tar shards (resumable)")
    p.add_argument("source", nargs="?", help="an image folder, or a COCO .json (images in --images or beside it); "
                                             "not needed with --verify")
    p.add_argument("--out", required=True, help="output folder (shards.json, shard-NNNNNN.tar + .idx)")
    p.add_argument("--boxes", help="box store (.boxes) to pack with the images; 'gt': the COCO json's boxes; "
                                   "omitted: no boxes (scene-scene only)")
    p.add_argument("--images", help="image folder of a COCO json (default <json dir>/images)")
    p.add_argument("--shard-size", type=_size, default=256 << 20, help="tar bytes per shard (e.g. 256M; default 256M)")
    p.add_argument("--max-samples", type=int, default=None, help="also at most this many samples per shard")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--restart", action="store_true", help="replace shards of a different earlier pack in --out")
    p.add_argument("--max-shards", type=int, default=None, help="write at most this many shards (rerun to go on)")
    p.add_argument("--no-check", action="store_true", help="skip the per-file header scan of the image index")
    p.add_argument("--verify", action="store_true", help="only check the shards in --out (deep) and report")
    p.add_argument("--part", default=None, help="write only this part's shards (every num-parts-th): a number with "
                                                "--num-parts, or 'auto' (Slurm array task / torchrun rank)")
    p.add_argument("--num-parts", type=int, default=None, help="how many processes pack the set together")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..joblock import OutputLockedError
    from ..shards import ShardSet, pack
    if args.verify:
        try:
            bad = ShardSet.open(args.out).verify(deep=True)
        except (OSError, ValueError) as e:
            print(f"pack: error: {e}", file=sys.stderr)
            return 1
        for name, why in bad.items():
            print(f"damaged: {name}: {why}", file=sys.stderr)
        print(f"{args.out}: {len(bad)} damaged shard(s)")
        return 1 if bad else 0
    if args.source is None:
        print("pack: error: the source (an image folder or a COCO .json) is required, except with --verify",
              file=sys.stderr)
        return 2
    from ..boxstore import BoxStore
    from ..proposals.run import load_index
    index = load_index(args.source, args.images, check=not args.no_check)
    store = None
    if args.boxes == "gt":
        if not str(args.source).endswith(".json"):
            raise SystemExit("--boxes gt needs a COCO .json source")
        from ..index import gt_store
        store = gt_store(args.source, index)   # mapped from the pass that built the index
    elif args.boxes:
        store = BoxStore.load(args.boxes)
    part, num = 0, 1
    if args.part is not None:
        from ..proposals.distributed import resolve_part
        if args.part == "auto":
            if args.num_parts is not None:
                raise SystemExit("--part auto reads the part and the count from the environment; drop --num-parts")
            part, num = resolve_part(None, None)
        else:
            part, num = resolve_part(int(args.part), args.num_parts)
    try:
        rep = pack(index, args.out, store, shard_bytes=args.shard_size, max_samples=args.max_samples,
                   prefix=args.prefix, restart=args.restart, progress=not args.no_progress,
                   max_shards=args.max_shards, part=part, num_parts=num)
    except (OutputLockedError, ValueError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 1
    if rep.cleaned:
        print(f"  removed {rep.cleaned} temporary file(s) a killed earlier pack left", file=sys.stderr)
    for key, why in list(rep.skipped.items())[:10]:
        print(f"  skipped by the index scan: {key}: {why}", file=sys.stderr)
    print(f"{args.out}: {rep.shards} shards{'' if num == 1 else f' of part {part}/{num}'} ({rep.written} written, {rep.resumed} already there), "
          f"{rep.samples} samples, {rep.bytes / 2**20:.1f} MiB in {rep.seconds:.1f} s; {len(rep.skipped)} skipped")
    if rep.resumed + rep.written < rep.shards:
        print("stopped early (--max-shards); rerun the same command to continue", file=sys.stderr)
        return 3
    return 0
