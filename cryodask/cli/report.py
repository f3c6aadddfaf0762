"""Write a run's pictures and a self-contained HTML report (FSC, classes, slices, angles, convergence).

Opens a finished or running job, cryodask's or RELION's own Refine3D / Class3D / Class2D
output (a job folder, a rootname, or one of its files; an _itNNN_optimiser.star reports
that iteration), writes PNGs beside its outputs (<root>_fsc.png, _classes.png or
_slices.png, _angles.png, _convergence.png) and <root>_report.html with the pictures
embedded, and prints the HTML's path.

Examples
--------
  cryodask report Refine3D/job012                # -> Refine3D/job012/run_report.html
  cryodask report Class2D/run --o reports/       # -> reports/run_report.html (+ PNGs there)
  cryodask report Class3D/run_it010_optimiser.star --o it10.html
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="job folder, rootname (Refine3D/run) or one of the run's files")
    parser.add_argument("--o", default=None, metavar="OUT",
                        help="an .html file or a folder (default: <root>_report.html beside the outputs)")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (default 100)")


def main(args: argparse.Namespace) -> int:
    from cryodask.errors import UserError
    from cryodask.report import write_report
    from cryodask.runs import open_run

    if args.dpi < 10:
        raise UserError("--dpi", f"{args.dpi}: give at least 10 (e.g. 100)")
    run = open_run(args.run)
    path = write_report(run, args.o, dpi=args.dpi)
    print(path)
    return 0
