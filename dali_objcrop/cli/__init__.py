"""The ``dali-objcrop`` command line (also ``python -m dali_objcrop``).

The one home of the command line: one module per subcommand in this package,
registered in ``SUBCOMMANDS`` below.  Each module exposes
``add_parser(subparsers)``, which registers its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Subcommand modules are imported only when needed and import the library lazily
inside ``run``, so ``dali-objcrop synth`` does not pay for importing DALI or
torch.  Nothing else in the package imports ``dali_objcrop.cli``.
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
]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dali-objcrop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS:
        if only is None or only == name:
            importlib.import_module(module).add_parser(sub)
        else:  # a placeholder so --help lists it without importing it
            sub.add_parser(name, help=f"(see dali-objcrop {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    names = [n for n, _ in SUBCOMMANDS]
    parser = build_parser(first if first in names else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
