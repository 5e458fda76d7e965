"""The `rankbias` command. Each subcommand lives in its own module, which exposes
``register(subparsers)``; the module adds a parser and sets ``func`` on it."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from . import timing

# Modules that contribute subcommands, in the order `rankbias --help` lists them.
SUBCOMMAND_MODULES = (
    "rankbias.train",
    "rankbias.bench",
    "rankbias.data",
    "rankbias.sweep",
    "rankbias.figures",
    "rankbias.claims",
    "rankbias.audit",
    "rankbias.restore",
    "rankbias.timing",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankbias", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    startup, t0, rc = timing.process_age(), time.perf_counter(), 1
    try:
        rc = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("rankbias: interrupted", file=sys.stderr)
        rc = 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"rankbias {args.command}: error: {e}", file=sys.stderr)
    finally:
        if args.command != "timing":
            target = " ".join(str(v) for v in vars(args).values() if isinstance(v, (str, list)))[:200]
            timing.record(args.command, target, startup, time.perf_counter() - t0, rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
