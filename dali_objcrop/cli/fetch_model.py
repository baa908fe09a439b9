"""``dali-objcrop fetch-model``: download OpenCV's pretrained BING files (pinned URL + sha256)."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-model", help="download OpenCV's pretrained BING files (pinned URL + sha256)")
    p.add_argument("name", choices=["bing"], help="which model (only 'bing')")
    p.add_argument("--cache-dir", help="destination (default $DALI_OBJCROP_HOME/models/bing-opencv)")
    p.add_argument("--colors", default="MAXBGR,HSV,I", help="comma-separated colour models (default all three)")
    p.add_argument("--base-url", help="alternative location of the files (a mirror)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals.fetch import FetchError, fetch_bing
    try:
        d = fetch_bing(args.cache_dir, tuple(c.strip() for c in args.colors.split(",")), args.base_url)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(d)
    return 0
