"""The ``dali-objcrop`` command line (also ``python -m dali_objcrop``).

The one home of the command line: one module per subcommand in this package,
registered in ``SUBCOMMANDS`` below.  Each module exposes
``add_parser(subparsers)``, which registers its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Subcommand modules are imported only when needed and import the library lazily
inside ``run``, so ``dali-objcrop synth`` does not pay for importing DALI or
torch.  Nothing else in the package imports ``dali_objcrop.cli``.

The trainer's entry points (``TRAINER_COMMANDS``) take typed ``--field=value``
settings (:mod:`dali_objcrop.train.config`); their arguments go to the module's
``main(argv)`` unparsed.  Under torchrun: ``torchrun --nproc_per_node=8 -m
dali_objcrop pretrain --method=byol ...``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module that implements it); the module's add_parser registers it.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("synth", "dali_objcrop.cli.synth"),
    ("show", "dali_objcrop.cli.show"),
    ("crop-stats", "dali_objcrop.cli.crop_stats"),
    ("demo", "dali_objcrop.cli.demo"),
    ("proposals", "dali_objcrop.cli.proposals"),
    ("eval-proposals", "dali_objcrop.cli.eval_proposals"),
    ("train-bing", "dali_objcrop.cli.train_bing"),
    ("fetch-model", "dali_objcrop.cli.fetch_model"),
    ("pack", "dali_objcrop.cli.pack"),
    ("merge", "dali_objcrop.cli.merge"),
    ("index", "dali_objcrop.cli.index"),
]

# (subcommand, module with main(argv), help): dataclass-configured, --help lists the settings
TRAINER_COMMANDS: list[tuple[str, str, str]] = [
    ("pretrain", "dali_objcrop.train.pretrain",
     "self-supervised pretraining (MoCo-v2, BYOL, DenseCL) on object-aware crops; torchrun-ready"),
    ("linear-eval", "dali_objcrop.train.linear_eval", "linear probe of a frozen backbone (mAP or top-1)"),
    ("knn-eval", "dali_objcrop.train.knn_eval", "weighted kNN evaluation of a frozen backbone (mAP or top-1)"),
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dali-objcrop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS:
        if only is None or only == name:
            importlib.import_module(module).add_parser(sub)
        else:  # a placeholder so --help lists it without importing it
            sub.add_parser(name, help=f"(see dali-objcrop {name} --help)", add_help=False)
    for name, _, text in TRAINER_COMMANDS:
        sub.add_parser(name, help=f"{text} (--field=value settings)", add_help=False)
    return parser


def run_trainer_command(name: str, argv: list[str]) -> int:
    """A trainer entry point with its own ``--field=value`` settings (a bad one: a message and exit code 2)."""
    module = dict((n, m) for n, m, _ in TRAINER_COMMANDS)[name]
    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in [n for n, _, _ in TRAINER_COMMANDS]:
        return run_trainer_command(argv[0], argv[1:])
    first = next((a for a in argv if not a.startswith("-")), None)
    names = [n for n, _ in SUBCOMMANDS]
    parser = build_parser(first if first in names else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:   # a damaged or hostile shard set: one line naming it, no traceback
        from ..shards import ShardError
        if not isinstance(e, ShardError):
            raise
        print(f"dali-objcrop {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
