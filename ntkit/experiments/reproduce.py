"""``ntkit reproduce NAME [--quick] --out DIR``: the founding papers' results, one command each.

Each reproduction is a module of :mod:`ntkit.experiments.reproductions` with ``NAME``, ``TITLE``, a
docstring stating the paper's setup and ours, and ``run(out=None, *, quick=False, seed=0, data=None,
progress=True) -> Report``. This module lists them and runs one from the command line.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

__all__ = ["REPRODUCTIONS", "available", "load", "main"]

#: command-line name -> module of ntkit.experiments.reproductions (in the order of the papers' list)
REPRODUCTIONS = {
    "jacot-kernel": "jacot_kernel",
    "jacot-function": "jacot_function",
    "jacot-pca": "jacot_pca",
    "geiger-scaling": "geiger_scaling",
    "lee-linearization": "lee_linearization",
    "hanin-nica": "hanin_nica",
    "xiao-phase": "xiao_phase",
    "geifman-laplace": "geifman_laplace",
    "malach-tangent": "malach_tangent",
    "huang-orthogonal": "huang_orthogonal",
    "arora-uci": "arora_uci",
    "alemohammad-rntk": "alemohammad_rntk",
    "zandieh-sketch": "zandieh_sketch",
}


def load(name: str):
    """The module of reproduction ``name`` (raises ValueError naming the choices if unknown)."""
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; choose from: {', '.join(REPRODUCTIONS)}")
    try:
        return import_module(f"ntkit.experiments.reproductions.{REPRODUCTIONS[name]}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(REPRODUCTIONS[name]):
            raise ValueError(f"reproduction {name!r} is not available in this version of ntkit") from None
        raise


def available() -> dict[str, str]:
    """``{name: title}`` of the reproductions this installation has."""
    out = {}
    for name in REPRODUCTIONS:
        try:
            out[name] = load(name).TITLE
        except ValueError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="ntkit reproduce",
        description="Reproduce a founding paper's result; writes results.json (with checked claims), figures "
                    "and report.html to --out.",
        epilog="example: ntkit reproduce jacot-kernel --quick --out out/jacot-kernel")
    p.add_argument("name", nargs="?", help="reproduction to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the available reproductions and exit")
    p.add_argument("--quick", action="store_true", help="the same code at a size that runs in about a minute")
    p.add_argument("--out", help="output folder (results.json, PNGs, report.html)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="data path where a reproduction uses real data (e.g. an MNIST folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.list:
        for name, title in available().items():
            print(f"{name:20s} {title}")
        return 0
    if not a.name:
        p.error("name a reproduction (see --list)")
    if not a.out:
        p.error("the following arguments are required: --out")
    try:
        mod = load(a.name)
    except ValueError as exc:
        p.exit(2, f"ntkit reproduce: error: {exc}\n")
    rep = mod.run(a.out, quick=a.quick, seed=a.seed, data=a.data, progress=not a.no_progress)
    n_ok = sum(c["holds"] for c in rep.claims)
    print(f"{a.name}: {n_ok}/{len(rep.claims)} claims hold")
    print(f"{a.out}/report.html")
    return 0 if rep.all_claims_hold else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
