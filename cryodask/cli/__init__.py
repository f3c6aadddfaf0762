"""The ``cryodask`` command line: one module per subcommand.

Each subcommand module has a docstring (its first line is the one-line
description, the rest is the help text with runnable examples), an
``add_args(parser)`` and a ``main(args)``. Heavy imports live inside ``main``
so that ``cryodask --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cryodask.errors import UserError

#: subcommand name -> module. Add a line here for a new subcommand.
COMMANDS: dict[str, str] = {
    "import": "cryodask.cli.import_particles",
    "simulate": "cryodask.cli.simulate",
    "project": "cryodask.cli.project",
    "reconstruct": "cryodask.cli.reconstruct",
    "demo": "cryodask.cli.demo",
    "refine3d": "cryodask.cli.refine3d",
    "class3d": "cryodask.cli.class3d",
    "cluster": "cryodask.cli.cluster",
    "class2d": "cryodask.cli.class2d",
    "estimate": "cryodask.cli.estimate",
    "report": "cryodask.cli.report",
    "select": "cryodask.cli.select",
}


def command_line(args: argparse.Namespace, command: str) -> str:
    """The options of ``args`` as a ``cryodask <command> ...`` line (the first line of each _optimiser.star)."""
    import shlex

    words = ["cryodask", command]
    for k, v in vars(args).items():
        if k.startswith("_") or k == "command" or v is None or v is False:
            continue
        name = "--continue" if k == "continue_from" else f"--{k}"
        words += [name] if v is True else [name, shlex.quote(str(v))]
    return " ".join(words)


def _load(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryodask",
        description="Cryo-EM single-particle refinement as Dask task graphs; reads and writes RELION's files.",
    )
    from cryodask import __version__

    parser.add_argument("--version", action="version", version=f"cryodask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as exc:  # a subcommand still being written
            if exc.name != COMMANDS[name]:
                raise
            continue
        doc = (module.__doc__ or name).strip()
        summary = doc.splitlines()[0]
        # options by their whole names, as RELION's: an abbreviation could take another job's option
        # (estimate reads a job's command line: --o is not --offset_range)
        p = sub.add_parser(name, help=summary, description=doc, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cryodask``; returns the exit status (2 for user errors, without a traceback)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if extra:  # only a command that takes another's options (estimate: the job's) accepts more
            accept = getattr(_load(args.command), "accept_extra", None)
            if accept is None:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            accept(args, extra)
        status = args._main(args)
    except UserError as exc:
        print(f"cryodask: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cryodask: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
