"""Reproductions of the founding papers' results, one module each (see :mod:`ntkit.experiments.reproduce`).

Every module defines ``NAME`` (the command-line name), ``TITLE``, a docstring stating the paper's setup
(what is the paper's, what is ours and why), and ``run(out=None, *, quick=False, seed=0, data=None,
progress=True) -> ntkit.report.Report``; ``results.json["claims"]`` holds the claims it checks.
"""
