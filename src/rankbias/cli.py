"""The `rankbias` command. Each subcommand lives in its own module, which exposes
``register(subparsers)``; the module adds a parser and sets ``func`` on it."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from rankbias.core import timing

from rankbias import __version__

DESCRIPTION = """\
Reproduce "SGD and weight decay secretly minimise the rank of your neural network"
(Galanti, Siegel, Gupte, Poggio): train the paper's experiment grids as batched models,
store each run's per-epoch singular values, draw the paper's figures from them and judge
each of its claims on what was measured. Every output records its provenance."""

EPILOG = """\
The Snakemake workflow in the repository calls these commands; to run everything:
  snakemake                                   quick profile (config/config.yaml)
  snakemake --configfile config/paper.yaml    the paper's full grids
Then `rankbias audit results/figures/fig2.png` shows what made a figure.
`rankbias COMMAND --help` describes one command."""

# Each subcommand and the module that registers it, in the order `rankbias --help` lists
# them. Only the module of the command given is imported, so `rankbias figure` and the
# other commands that read stored results never import torch (`tests/test_cli.py` checks
# that every module registers the command named here).
SUBCOMMANDS = {
    "train": "rankbias.train.loop",
    "bench": "rankbias.train.bench",
    "data": "rankbias.train.data",
    "plan": "rankbias.plan.sweep",
    "schema": "rankbias.plan.schema",
    "figure": "rankbias.analysis.figures",
    "claims": "rankbias.analysis.claims",
    "audit": "rankbias.verify.audit",
    "restore": "rankbias.verify.restore",
    "publish": "rankbias.verify.publish",
    "export-crate": "rankbias.verify.crate",
    "timing": "rankbias.core.timing",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of `command`'s alone."""
    parser = argparse.ArgumentParser(prog="rankbias", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in SUBCOMMANDS.items():
        if command in (None, name):
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
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
