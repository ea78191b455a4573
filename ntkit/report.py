"""Self-contained HTML reports of results and matplotlib figures.

A :class:`Report` collects sections of short paragraphs, figures, tables and *claims* (a statement,
the number measured and the number or interval expected), then writes into one folder:

* ``report.html`` -- one file, figures embedded as base64 PNG, no network needed to view it;
* ``results.json`` -- the results dict (JSON-able), with the claims under ``"claims"``;
* ``<name>.png`` -- every figure, for papers and slides.

Every CLI command that produces results writes its ``--out DIR`` through this module, and so do the
demo and the reproductions of :mod:`ntkit.experiments`.

Examples
--------
>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> from ntkit.report import Report, claim
>>> rep = Report("Kernel convergence", intro="Finite networks approach the exact kernel.")
>>> _ = rep.section("Width", "The error falls like width^-1/2.")
>>> fig, ax = plt.subplots()
>>> _ = ax.loglog([64, 256, 1024], [0.2, 0.1, 0.05])
>>> _ = rep.figure(fig, "error_vs_width", "Relative kernel error vs width.")
>>> _ = rep.add_claim(claim("slope of log error vs log width", -0.5, [-0.6, -0.4]))
>>> import tempfile; path = rep.save(tempfile.mkdtemp())
>>> path.name
'report.html'
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import numbers
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Report", "claim", "to_jsonable", "ReportError"]


class ReportError(ValueError):
    """A report was given something it cannot hold (a non-figure, a duplicate figure name, ...)."""


# ---------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths, tuples and sets into plain JSON types.

    Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` so that the file stays
    valid JSON (``json.loads`` of standard JSON has no Infinity).
    """
    try:  # torch is optional here: reports can be built from plain numbers
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()] if obj.ndim else to_jsonable(obj.item())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        v = float(obj)
        if math.isfinite(v):
            return v
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise ReportError(f"cannot store {type(obj).__name__} {obj!r} in results.json; convert it to numbers, "
                      "strings, lists or dicts first")


def claim(text: str, measured: float, expected: float | Sequence[float], holds: bool | None = None,
          *, rtol: float | None = None, **details: Any) -> dict:
    """A machine-readable claim: ``{"claim", "measured", "expected", "holds", ...}``.

    Parameters
    ----------
    text : str
        The statement, e.g. ``"seed spread falls like width^-1/2 (fitted exponent)"``.
    measured : float
        The number this run measured.
    expected : float or (low, high)
        The paper's number or the interval the statement allows (``-inf``/``inf`` for one-sided).
    holds : bool, optional
        Whether the claim holds; by default computed: ``low <= measured <= high`` for an interval,
        ``|measured - expected| <= rtol * |expected|`` for a number (``rtol`` then required).
    rtol : float, optional
        Relative tolerance for a numeric ``expected``.
    **details
        Anything else worth keeping next to the claim (standard error, n, tolerance's origin).
    """
    m = float(measured)
    if isinstance(expected, (list, tuple, np.ndarray)):
        if len(expected) != 2:
            raise ReportError(f"expected must be a number or [low, high], got {expected!r}")
        lo, hi = float(expected[0]), float(expected[1])
        if lo > hi:
            raise ReportError(f"expected interval [{lo}, {hi}] has low > high")
        exp: Any = [lo, hi]
        ok = lo <= m <= hi
    else:
        exp = float(expected)
        if holds is None and rtol is None:
            raise ReportError("a claim with a single expected number needs rtol= (or holds=) to decide it")
        ok = abs(m - exp) <= (rtol or 0.0) * abs(exp)
        if rtol is not None:
            details.setdefault("rtol", rtol)
    if holds is not None:
        ok = bool(holds)
    if math.isnan(m):
        ok = False
    return {"claim": str(text), "measured": m, "expected": exp, "holds": bool(ok), **details}


# ---------------------------------------------------------------------------------------------------
@dataclass
class _Block:
    kind: str  # "section" | "text" | "figure" | "table" | "claims" | "html"
    payload: Any


@dataclass
class Report:
    """A report under construction; :meth:`save` writes it.

    Parameters
    ----------
    title : str
        Page title and heading.
    intro : str, optional
        A paragraph under the title (what was run, on what, why).
    results : dict, optional
        Initial JSON-able results; more via :meth:`update`.
    """

    title: str
    intro: str | None = None
    results: dict = field(default_factory=dict)
    _blocks: list = field(default_factory=list, repr=False)
    _figures: dict = field(default_factory=dict, repr=False)
    _claims: list = field(default_factory=list, repr=False)

    # -- building -----------------------------------------------------------------------------------
    def section(self, title: str, text: str | None = None) -> "Report":
        """Start a section with an optional paragraph."""
        self._blocks.append(_Block("section", str(title)))
        if text:
            self.text(text)
        return self

    def text(self, paragraph: str) -> "Report":
        """A paragraph (plain text; blank lines separate paragraphs)."""
        self._blocks.append(_Block("text", str(paragraph)))
        return self

    def figure(self, fig, name: str, caption: str = "", *, dpi: int = 110, close: bool = True) -> "Report":
        """Embed a matplotlib figure (saved as ``name.png`` too); ``close`` frees it afterwards."""
        if not hasattr(fig, "savefig"):
            raise ReportError(f"figure expects a matplotlib Figure, got {type(fig).__name__}")
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ReportError(f"figure name {name!r} must be a plain file stem (letters, digits, '-', '_')")
        if name in self._figures:
            raise ReportError(f"a figure named {name!r} is already in the report")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        if close and getattr(getattr(fig, "canvas", None), "manager", None) is not None:
            import matplotlib.pyplot as plt  # only figures made by pyplot are registered there

            plt.close(fig)
        return self.image(buf.getvalue(), name, caption)

    def image(self, png: bytes | str | os.PathLike, name: str, caption: str = "") -> "Report":
        """Embed a PNG given as bytes or a file path (e.g. a figure saved by an earlier run)."""
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ReportError(f"figure name {name!r} must be a plain file stem (letters, digits, '-', '_')")
        if name in self._figures:
            raise ReportError(f"a figure named {name!r} is already in the report")
        data = png if isinstance(png, (bytes, bytearray)) else Path(png).read_bytes()
        if not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
            raise ReportError(f"figure {name!r} is not a PNG image")
        self._figures[name] = bytes(data)
        self._blocks.append(_Block("figure", (name, str(caption))))
        return self

    def table(self, rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], *,
              columns: Sequence[str] | None = None, caption: str = "", fmt: str = "{:.4g}") -> "Report":
        """A table from a list of dicts (columns = keys of the first) or of rows with ``columns``."""
        rows = list(rows)
        if rows and isinstance(rows[0], Mapping):
            columns = list(columns or rows[0].keys())
            body = [[r.get(c, "") for c in columns] for r in rows]
        else:
            if columns is None:
                raise ReportError("a table of plain rows needs columns=")
            body = [list(r) for r in rows]
        self._blocks.append(_Block("table", (list(columns), body, str(caption), fmt)))
        return self

    def add_claim(self, c: Mapping[str, Any]) -> "Report":
        """Record a claim (see :func:`claim`); all claims are shown in one table and saved to results.json."""
        for key in ("claim", "measured", "expected", "holds"):
            if key not in c:
                raise ReportError(f"a claim needs the key {key!r}; build it with ntkit.report.claim(...)")
        self._claims.append(dict(c))
        return self

    def claims_table(self, caption: str = "Claims checked in this run") -> "Report":
        """Place the table of all claims here (otherwise it goes at the end)."""
        self._blocks.append(_Block("claims", str(caption)))
        return self

    def update(self, results: Mapping[str, Any] | None = None, **more: Any) -> "Report":
        """Merge JSON-able results into ``results.json``."""
        self.results.update(dict(results or {}), **more)
        return self

    @property
    def claims(self) -> list[dict]:
        return list(self._claims)

    @property
    def all_claims_hold(self) -> bool:
        return all(c["holds"] for c in self._claims)

    @property
    def n_figures(self) -> int:
        return len(self._figures)

    # -- writing ------------------------------------------------------------------------------------
    def to_results(self) -> dict:
        """The JSON-able results, with ``claims``, provenance and the page layout under ``report``.

        ``report.layout`` lists the blocks in order (sections, paragraphs, figure names and captions,
        tables, the claims table), so :meth:`from_folder` can render the same page again from
        ``results.json`` and the PNGs.
        """
        out = to_jsonable(self.results)
        out["claims"] = to_jsonable(self._claims)
        meta = dict(out.get("report") or {}) if isinstance(out.get("report"), Mapping) else {}
        meta.setdefault("created", _now())
        meta.setdefault("provenance", _provenance())
        meta.update(title=self.title, intro=self.intro, layout=to_jsonable(self._layout()))
        out["report"] = meta
        return out

    def _layout(self) -> list:
        layout = []
        for b in self._blocks:
            if b.kind == "figure":
                layout.append({"kind": "figure", "name": b.payload[0], "caption": b.payload[1]})
            elif b.kind == "table":
                cols, body, cap, fmt = b.payload
                layout.append({"kind": "table", "columns": cols, "rows": body, "caption": cap, "fmt": fmt})
            else:
                layout.append({"kind": b.kind, "text": b.payload})
        return layout

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, title: str | None = None) -> "Report":
        """Rebuild a report from a folder holding ``results.json`` and PNGs (re-render after editing).

        With the layout that :meth:`save` records, the page comes back block for block (figures read
        from ``<name>.png``). A ``results.json`` without it (written by other tools) gets a generic
        page: its scalar results as a table, every PNG of the folder as a figure, and its claims.
        A path to a ``results.json`` file is accepted too (its folder holds the PNGs).
        """
        p = Path(folder)
        res_path = p if p.is_file() else p / "results.json"
        if not res_path.is_file():
            raise ReportError(f"no results.json in {p}; pass a folder written by ntkit (or a results.json path)")
        try:
            results = json.loads(res_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{res_path} is not valid JSON ({exc})") from None
        if not isinstance(results, dict):
            raise ReportError(f"{res_path} holds a JSON {type(results).__name__}; expected an object of results")
        base = res_path.parent
        meta = results.get("report") if isinstance(results.get("report"), dict) else {}
        claims = results.pop("claims", []) or []
        rep = cls(title or meta.get("title") or base.resolve().name, intro=meta.get("intro"))
        rep.results = {k: v for k, v in results.items() if k != "report"}
        if meta:
            rep.results["report"] = {k: v for k, v in meta.items() if k in ("created", "provenance")}
        for c in claims if isinstance(claims, list) else []:
            if isinstance(c, Mapping) and all(k in c for k in ("claim", "measured", "expected", "holds")):
                rep._claims.append(dict(c))
        layout = meta.get("layout")
        if isinstance(layout, list):
            for blk in layout:
                kind = blk.get("kind")
                if kind == "figure":
                    png = base / f"{blk['name']}.png"
                    if not png.is_file():
                        raise ReportError(f"the report shows figure {blk['name']!r} but {png} is missing")
                    rep.image(png, blk["name"], blk.get("caption", ""))
                elif kind == "table":
                    rep.table(blk["rows"], columns=blk["columns"], caption=blk.get("caption", ""),
                              fmt=blk.get("fmt", "{:.4g}"))
                elif kind in ("section", "text", "claims"):
                    rep._blocks.append(_Block(kind, str(blk.get("text", ""))))
            return rep
        scalars = [{"result": k, "value": v} for k, v in _flatten(rep.results).items()
                   if not k.startswith("report.")]
        if scalars:
            rep.section("Results")
            rep.table(scalars, columns=["result", "value"])
        pngs = sorted(base.glob("*.png"))
        if pngs:
            rep.section("Figures")
            for png in pngs:
                rep.image(png, png.stem, png.stem.replace("_", " "))
        return rep

    def to_html(self) -> str:
        """The whole page as one string (figures inlined)."""
        parts = [_HEAD.format(title=html.escape(self.title)), f"<h1>{html.escape(self.title)}</h1>"]
        if self.intro:
            parts.append(_paragraphs(self.intro))
        claims_placed = False
        for block in self._blocks:
            if block.kind == "section":
                parts.append(f"<h2>{html.escape(block.payload)}</h2>")
            elif block.kind == "text":
                parts.append(_paragraphs(block.payload))
            elif block.kind == "figure":
                name, caption = block.payload
                data = base64.b64encode(self._figures[name]).decode("ascii")
                parts.append(f'<figure id="{html.escape(name)}"><img alt="{html.escape(caption or name)}" '
                             f'src="data:image/png;base64,{data}"/>'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            elif block.kind == "table":
                parts.append(_table_html(*block.payload))
            elif block.kind == "claims":
                parts.append(self._claims_html(block.payload))
                claims_placed = True
        if self._claims and not claims_placed:
            parts.append("<h2>Claims</h2>" + self._claims_html("Claims checked in this run"))
        prov = _provenance()
        parts.append(f'<footer>ntkit {html.escape(prov["ntkit"])} · torch {html.escape(prov["torch"])} · '
                     f'{html.escape(prov["machine"])} · {html.escape(_now())}</footer></body></html>')
        return "\n".join(parts)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``report.html``, ``results.json`` and the PNGs into ``out_dir``; returns the HTML path."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out} exists and is not a folder; choose a folder path")
        out.mkdir(parents=True, exist_ok=True)
        for name, png in self._figures.items():
            (out / f"{name}.png").write_bytes(png)
        (out / "results.json").write_text(json.dumps(self.to_results(), indent=1))
        path = out / "report.html"
        path.write_text(self.to_html(), encoding="utf-8")
        return path

    def _claims_html(self, caption: str) -> str:
        rows = []
        for c in self._claims:
            exp = c["expected"]
            exp_s = (f"[{_fmt(exp[0])}, {_fmt(exp[1])}]" if isinstance(exp, (list, tuple)) else _fmt(exp))
            mark = '<span class="ok">holds</span>' if c["holds"] else '<span class="bad">fails</span>'
            rows.append(f"<tr><td>{html.escape(str(c['claim']))}</td><td>{_fmt(c['measured'])}</td>"
                        f"<td>{html.escape(exp_s)}</td><td>{mark}</td></tr>")
        return (f'<table class="claims"><caption>{html.escape(caption)}</caption><tr><th>claim</th>'
                f"<th>measured</th><th>expected</th><th></th></tr>{''.join(rows)}</table>")


# ---------------------------------------------------------------------------------------------------
def _fmt(v: Any, fmt: str = "{:.4g}") -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return fmt.format(float(v))
    return str(v)


def _flatten(d: Mapping, prefix: str = "", limit: int = 200) -> dict:
    """Scalar leaves of nested dicts as {"a.b": value} (lists of up to 8 numbers shown inline)."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + ".", limit))
        elif isinstance(v, (bool, numbers.Real, str)) or v is None:
            out[key] = v
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (numbers.Real, str)) for x in v):
            out[key] = ", ".join(_fmt(x) for x in v)
        if len(out) >= limit:
            break
    return out


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in str(text).split("\n\n") if p.strip())


def _table_html(columns: list, body: list, caption: str, fmt: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td{_num_class(v)}>{html.escape(_fmt(v, fmt))}</td>" for v in r) + "</tr>"
                   for r in body)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<tr>{head}</tr>{rows}</table>"


def _num_class(v: Any) -> str:
    """Numbers are right-aligned, text left-aligned."""
    return ' class="num"' if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) else ""


def _now() -> str:
    return _dt.datetime.now().replace(microsecond=0).isoformat(sep=" ")


def _provenance() -> dict:
    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = "n/a"
    from . import __version__

    return {"ntkit": __version__, "torch": tv, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/><meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.5; }}
h1 {{ font-size: 1.7rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }}
h2 {{ font-size: 1.25rem; margin-top: 2.2rem; }}
figure {{ margin: 1rem 0; text-align: center; }}
figure img {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: .9rem; color: #555; margin-top: .3rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }}
caption {{ caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }}
th, td {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }}
td.num, table.claims td:nth-child(2), table.claims td:nth-child(3) {{ text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
.ok {{ color: #0a7d28; font-weight: 600; }} .bad {{ color: #b00020; font-weight: 600; }}
footer {{ margin-top: 3rem; font-size: .8rem; color: #777; border-top: 1px solid #eee; padding-top: .5rem; }}
</style></head><body>"""
