"""The UCI-90 benchmark of Arora et al. (2020), "Harnessing the power of infinitely wide deep nets on
small-data tasks" (ICLR 2020), Sec. 4 / Table 1.

Data: the 90 UCI classification sets preprocessed by Fernandez-Delgado et al. (JMLR 2014) with at
most 5000 samples and no separate test file, one folder per set (``NAME/NAME.txt``,
``NAME/NAME_R.dat``, ``NAME/conxuntos.dat``, ``NAME/conxuntos_kfold.dat``).

Protocol (Arora et al. 2020, Sec. 4 and their released code): for every method, every
hyper-parameter configuration is fitted on the training half of ``conxuntos.dat`` and scored on its
validation half; the first configuration with the highest validation accuracy (grid order) is kept;
the reported accuracy is the mean test accuracy over the 4 folds of ``conxuntos_kfold.dat`` with that
configuration. The test folds are never used for selection. Each kernel is computed once on all
samples of a data set and sliced for every split.

Methods and grids (:func:`default_methods`):

* ``ntk``: SVM on the ReLU NTK with L = 1..5 layers (L - 1 hidden layers; L = 1 is the linear
  kernel), L' = 0..L-1 fixed bottom layers (L' = L - 1 trains only the readout, i.e. the NNGP of the
  top layer), W_std = 1, b_std = 0, first-layer covariance x.x' (the NTK of ``ntkit.mlp`` times the
  input dimension d; equal to Arora et al.'s kernel) and C in {1e-2, ..., 1e4} (7 values).
* ``laplace``: SVM on exp(-||x-x'||/l), l = s sqrt(d), s in {1/4, 1/2, 1, 2, 4, 8}; same C grid.
* ``gamma_exp``: SVM on exp(-(||x-x'||/l)^gamma), gamma in {0.5, 1.5}, same l and C grids.
* ``rbf``: SVM on exp(-||x-x'||^2/(2 l^2)), same l and C grids.
* ``rf``: random forest, 500 trees, max_features in {"sqrt", 0.5}.
* ``mlp``: a trained finite ReLU network (scikit-learn ``MLPClassifier``, Adam, width 256, 1, 2 or 3
  hidden layers, L2 penalty alpha in {1e-4, 1e-2}, at most 200 epochs with early stopping on 10% of
  the training part when that holds at least 2 samples per class).

Every SVM fit is capped at ``SVM_MAX_ITER`` libsvm iterations (a budget choice; Arora et al. ran
libsvm to convergence); capped fits are counted per method in the JSON (``n_capped``).

Summary statistics over data sets (Fernandez-Delgado et al. 2014, Sec. 4; Arora et al. 2020,
Table 1): mean accuracy, Friedman rank (mean rank among the compared methods, 1 = best, ties share
the mean rank), P90 / P95 (share of data sets where a method reaches >= 90% / 95% of the best
compared method's accuracy) and PMA (mean of accuracy / best accuracy, in percent). Note: the
paper ranks NTK among 180 classifiers; here the ranks and "best" are among the methods run.

Run from the command line::

    python -m ntkit.experiments.uci --data ../shared/data/uci --out benchmarks/out/uci
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .._progress import progress as _progress_bar
from ..estimators._kernels import make_kernel_function

__all__ = [
    "UCIDataset",
    "load_uci_dataset",
    "list_uci_datasets",
    "check_uci_datasets",
    "KernelSVMMethod",
    "EstimatorMethod",
    "default_methods",
    "evaluate_dataset",
    "run_uci",
    "summarize",
    "summary_markdown",
    "PAPER_TABLE1",
]

#: Arora et al. 2020, Table 1 (90 UCI sets): mean accuracy in percent, as reported in the paper.
PAPER_TABLE1 = {"ntk": 81.95, "rf": 81.56}

C_GRID = tuple(10.0 ** k for k in range(-2, 5))
SCALE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
GAMMA_GRID = (0.5, 1.5)
#: libsvm iteration cap per SVC fit (near-linear kernels at C = 1e4 can otherwise take minutes);
#: fits that hit it are counted in the per-data-set JSON as "n_capped"
SVM_MAX_ITER = 1_000_000


# ------------------------------------------------------------------------------------------------
# data
@dataclass(frozen=True)
class UCIDataset:
    """One preprocessed UCI data set with its hyper-parameter split and its 4 test folds."""

    name: str
    X: np.ndarray  # (n, d) float64, standardized features
    y: np.ndarray  # (n,) int64, 0-based labels
    n_classes: int
    train_idx: np.ndarray  # training half of conxuntos.dat (selection only)
    val_idx: np.ndarray  # validation half of conxuntos.dat (selection only)
    folds: tuple = field(default_factory=tuple)  # 4 x (train_idx, test_idx)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


def _read_meta(path: Path) -> dict:
    meta = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k.strip()] = v.strip()
    return meta


def _read_index_lines(path: Path) -> list[np.ndarray]:
    return [np.array(line.split(), dtype=np.int64) for line in path.read_text().splitlines() if line.strip()]


def load_uci_dataset(path: str | os.PathLike) -> UCIDataset:
    """Load one data set folder ``path`` (named after the set) in the Fernandez-Delgado format.

    Raises ``FileNotFoundError`` naming the missing file and ``ValueError`` when the files disagree
    (feature/sample counts against the metadata, indices out of range, labels outside 0..c-1).
    """
    root = Path(path)
    name = root.name
    meta_path, data_path = root / f"{name}.txt", root / f"{name}_R.dat"
    split_path, folds_path = root / "conxuntos.dat", root / "conxuntos_kfold.dat"
    for p in (meta_path, data_path, split_path, folds_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; a UCI data set folder needs NAME.txt, NAME_R.dat, "
                                    f"conxuntos.dat and conxuntos_kfold.dat.")
    meta = _read_meta(meta_path)
    table = np.loadtxt(data_path, skiprows=1, dtype=np.float64, ndmin=2)
    X = np.ascontiguousarray(table[:, 1:-1])
    labels = table[:, -1]
    if not np.all(labels == np.round(labels)):
        raise ValueError(f"{data_path}: the last column must hold integer class labels.")
    y = labels.astype(np.int64)
    n_classes = int(meta.get("n_clases", y.max() + 1))
    if "n_entradas" in meta and int(meta["n_entradas"]) != X.shape[1]:
        raise ValueError(f"{name}: metadata says {meta['n_entradas']} features, the data has {X.shape[1]}.")
    if "n_patrons1" in meta and int(meta["n_patrons1"]) != X.shape[0]:
        raise ValueError(f"{name}: metadata says {meta['n_patrons1']} samples, the data has {X.shape[0]}.")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{name}: labels must lie in 0..{n_classes - 1}, found {y.min()}..{y.max()}.")
    split = _read_index_lines(split_path)
    folds = _read_index_lines(folds_path)
    if len(split) != 2 or len(folds) != 8:
        raise ValueError(f"{name}: conxuntos.dat needs 2 index lines (got {len(split)}) and conxuntos_kfold.dat "
                         f"8 (got {len(folds)}).")
    for idx in split + folds:
        if idx.size == 0 or idx.min() < 0 or idx.max() >= X.shape[0]:
            raise ValueError(f"{name}: a split holds indices outside 0..{X.shape[0] - 1}.")
    return UCIDataset(name, X, y, n_classes, split[0], split[1],
                      tuple((folds[2 * i], folds[2 * i + 1]) for i in range(4)))


def list_uci_datasets(root: str | os.PathLike) -> list[str]:
    """Sorted names of the data set folders under ``root`` (folders holding ``NAME/NAME.txt``)."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"{r} is not a directory of UCI data set folders.")
    return sorted(p.name for p in r.iterdir() if p.is_dir() and (p / f"{p.name}.txt").is_file())


def check_uci_datasets(root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """``names`` as a list, after checking that each is a data set folder under ``root``.

    Raises ``ValueError`` naming the sets that are not there (with ``root``, how many are available and
    how to list them) and ``FileNotFoundError`` when ``root`` is not a directory.
    """
    names = list(names)
    available = list_uci_datasets(root)
    have = set(available)
    missing = [n for n in names if n not in have]
    if missing:
        shown = ", ".join(available[:10]) + (", ..." if len(available) > 10 else "")
        raise ValueError(
            f"data set(s) {missing} not found under {root} (a data set is a folder NAME holding NAME/NAME.txt); "
            f"{len(available)} data set(s) are available there" + (f": {shown}" if available else "") +
            f". List them with `python -m ntkit.experiments.uci --data {root} --list`.")
    return names


# ------------------------------------------------------------------------------------------------
# methods
@dataclass
class KernelSVMMethod:
    """An SVM (``SVC(kernel="precomputed")``) over a list of kernels times a C grid.

    ``kernels(ds)`` yields ``(params, build)`` in grid order; ``build()`` returns the (n, n) kernel
    on all samples of the data set, computed once and sliced for every split.
    """

    name: str
    kernels: Callable[[UCIDataset], Iterable[tuple[dict, Callable[[], np.ndarray]]]]
    C_grid: Sequence[float] = C_GRID
    max_iter: int = SVM_MAX_ITER

    def run(self, ds: UCIDataset) -> dict:
        import warnings  # noqa: PLC0415

        from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
        from sklearn.svm import SVC  # noqa: PLC0415

        capped = [0]

        def acc(K, tr, te, C):
            clf = SVC(kernel="precomputed", C=C, cache_size=500, max_iter=self.max_iter)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(K[np.ix_(tr, tr)], ds.y[tr])
            capped[0] += int(np.any(np.asarray(clf.n_iter_) >= self.max_iter))
            return float(np.mean(clf.predict(K[np.ix_(te, tr)]) == ds.y[te]))

        best_val, best_params, best_K, n_configs = -1.0, None, None, 0
        for params, build in self.kernels(ds):
            K = build()
            for C in self.C_grid:
                n_configs += 1
                a = acc(K, ds.train_idx, ds.val_idx, C)
                if a > best_val:
                    best_val, best_params, best_K = a, {**params, "C": C}, K
            del K
        fold_accs = [acc(best_K, tr, te, best_params["C"]) for tr, te in ds.folds]
        return {"val_acc": best_val, "params": best_params, "fold_accs": fold_accs,
                "test_acc": float(np.mean(fold_accs)), "n_configs": n_configs, "n_capped": capped[0]}


@dataclass
class EstimatorMethod:
    """A scikit-learn estimator over a list of parameter settings; ``make(params)`` builds one."""

    name: str
    grid: Sequence[dict]
    make: Callable[[dict], Any]

    def run(self, ds: UCIDataset) -> dict:
        def acc(params, tr, te):
            est = self.make(params)
            est.fit(ds.X[tr], ds.y[tr])
            return float(np.mean(est.predict(ds.X[te]) == ds.y[te]))

        best_val, best_params = -1.0, None
        for params in self.grid:
            a = acc(params, ds.train_idx, ds.val_idx)
            if a > best_val:
                best_val, best_params = a, dict(params)
        fold_accs = [acc(best_params, tr, te) for tr, te in ds.folds]
        return {"val_acc": best_val, "params": best_params, "fold_accs": fold_accs,
                "test_acc": float(np.mean(fold_accs)), "n_configs": len(self.grid)}


def _np_kernel(kf, X: np.ndarray, scale: float = 1.0) -> np.ndarray:
    K = kf(torch.from_numpy(X), dtype=torch.float64)
    if scale != 1.0:
        K.mul_(scale)
    return K.numpy()


def _ntk_kernels(max_depth: int):
    def gen(ds: UCIDataset):
        for L in range(1, max_depth + 1):
            for fixed in range(L):
                params = {"L": L, "fixed": fixed}
                kf = make_kernel_function("ntk", depth=L - 1, activation="relu", W_std=1.0, b_std=0.0,
                                          fixed_layers=fixed)
                yield params, (lambda kf=kf: _np_kernel(kf, ds.X, float(ds.n_features)))
    return gen


def _distance_kernels(kernel: str, scales: Sequence[float], gammas: Sequence[float] = (1.0,)):
    def gen(ds: UCIDataset):
        for g in gammas:
            for s in scales:
                ls = s * math.sqrt(ds.n_features)
                params = {"length_scale_factor": s}
                if kernel == "gamma_exponential":
                    params["gamma"] = g
                kf = make_kernel_function(kernel, length_scale=ls, gamma=g)
                yield params, (lambda kf=kf: _np_kernel(kf, ds.X))
    return gen


def default_methods(*, max_depth: int = 5, C_grid: Sequence[float] = C_GRID,
                    scale_grid: Sequence[float] = SCALE_GRID, gamma_grid: Sequence[float] = GAMMA_GRID,
                    rf_trees: int = 500, mlp_width: int = 256, mlp_max_iter: int = 200,
                    seed: int = 0) -> dict:
    """The methods and grids of the module docstring, keyed ``ntk, laplace, gamma_exp, rbf, rf, mlp``."""
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415

    def make_rf(p):
        return RandomForestClassifier(n_estimators=rf_trees, max_features=p["max_features"], random_state=seed,
                                      n_jobs=1)

    def make_mlp(p):
        import warnings  # noqa: PLC0415

        from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415

        class _Quiet(MLPClassifier):
            def fit(self, X, y):
                # early stopping needs a hold-out of 10% with room for every class
                self.early_stopping = 0.1 * len(y) >= 2 * len(np.unique(y))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    return super().fit(X, y)

        return _Quiet(hidden_layer_sizes=(mlp_width,) * p["hidden_layers"], alpha=p["alpha"],
                      max_iter=mlp_max_iter, early_stopping=True, random_state=seed)

    return {
        "ntk": KernelSVMMethod("ntk", _ntk_kernels(max_depth), tuple(C_grid)),
        "laplace": KernelSVMMethod("laplace", _distance_kernels("laplace", scale_grid), tuple(C_grid)),
        "gamma_exp": KernelSVMMethod("gamma_exp", _distance_kernels("gamma_exponential", scale_grid, gamma_grid),
                                     tuple(C_grid)),
        "rbf": KernelSVMMethod("rbf", _distance_kernels("rbf", scale_grid), tuple(C_grid)),
        "rf": EstimatorMethod("rf", [{"max_features": m} for m in ("sqrt", 0.5)], make_rf),
        "mlp": EstimatorMethod("mlp", [{"hidden_layers": h, "alpha": a} for h in (1, 2, 3) for a in (1e-4, 1e-2)],
                               make_mlp),
    }


# ------------------------------------------------------------------------------------------------
# running
def evaluate_dataset(ds: UCIDataset, methods: dict, previous: dict | None = None) -> dict:
    """Run every method in ``methods`` on ``ds`` (skipping those already in ``previous``)."""
    out = dict(previous or {})
    out.update({"name": ds.name, "n_samples": ds.n_samples, "n_features": ds.n_features,
                "n_classes": ds.n_classes})
    res = dict(out.get("methods", {}))
    for key, method in methods.items():
        if key in res:
            continue
        t0 = time.perf_counter()
        r = method.run(ds)
        r["time_s"] = time.perf_counter() - t0
        res[key] = r
    out["methods"] = res
    return out


_WORKER: dict = {}


def _run_one(name: str) -> tuple[str, dict]:
    """Evaluate (or resume) one data set and write its JSON atomically; used by run_uci's workers."""
    data_root, out, methods = _WORKER["data_root"], _WORKER["out"], _WORKER["methods"]
    path = out / f"{name}.json"
    prev = json.loads(path.read_text()) if path.is_file() else None
    if prev is None or any(k not in prev.get("methods", {}) for k in methods):
        ds = load_uci_dataset(Path(data_root) / name)
        prev = evaluate_dataset(ds, methods, prev)
        tmp = path.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(prev, indent=1))
        tmp.replace(path)
    return name, prev


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_uci(data_root: str | os.PathLike, out_dir: str | os.PathLike, *, methods: dict | None = None,
            datasets: Sequence[str] | None = None, progress: bool = True, jobs: int = 1,
            torch_threads: int | None = None) -> dict:
    """Run the protocol on every data set under ``data_root``; one JSON per set in ``out_dir``.

    Resumable: a data set whose JSON already holds every requested method is skipped; missing
    methods are added to it. ``jobs > 1`` evaluates data sets in that many forked worker processes
    (largest first; each with ``torch_threads`` torch threads, default 1). Writes ``summary.json`` and
    ``summary.md`` in ``out_dir`` and returns the summary (:func:`summarize`).
    """
    methods = default_methods() if methods is None else methods
    names = list_uci_datasets(data_root) if datasets is None else check_uci_datasets(data_root, datasets)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _WORKER.update(data_root=str(data_root), out=out, methods=methods)
    results = {}
    bar = _progress_bar(total=len(names), desc="UCI data sets", unit="set", enabled=progress)
    if jobs == 1:
        if torch_threads is not None:
            torch.set_num_threads(int(torch_threads))
        for name in names:
            bar.set_postfix_str(name)
            results[name] = _run_one(name)[1]
            bar.update(1)
    else:
        import multiprocessing as mp  # noqa: PLC0415
        from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

        def size(n):  # samples x samples, a proxy of the cost; largest first balances the workers
            meta = _read_meta(Path(data_root) / n / f"{n}.txt")
            return int(meta.get("n_patrons1", 0))

        order = sorted(names, key=size, reverse=True)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                 initargs=(int(torch_threads or 1),)) as ex:
            futs = [ex.submit(_run_one, n) for n in order]
            for f in as_completed(futs):
                name, res = f.result()
                results[name] = res
                bar.set_postfix_str(name)
                bar.update(1)
    bar.close()
    results = {n: results[n] for n in names}
    summary = summarize({n: {k: r["methods"][k]["test_acc"] for k in methods} for n, r in results.items()})
    summary["time_s_per_method"] = {k: float(sum(r["methods"][k].get("time_s", 0.0) for r in results.values()))
                                    for k in methods}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


# ------------------------------------------------------------------------------------------------
# statistics
def _ranks(row: np.ndarray) -> np.ndarray:
    """Ranks of a row of accuracies, 1 = highest, ties get the mean of their ranks."""
    from scipy.stats import rankdata  # noqa: PLC0415

    return rankdata(-row, method="average")


def summarize(acc: dict) -> dict:
    """Summary of ``acc[dataset][method]`` accuracies in [0, 1] (statistics of the module docstring).

    Every data set must hold every method. Returns, per method, ``mean``/``std`` accuracy (percent),
    ``friedman_rank``, ``p90``/``p95`` (percent of data sets) and ``pma``/``pma_std`` (percent).
    """
    names = sorted(acc)
    if not names:
        raise ValueError("summarize needs at least one data set.")
    methods = list(acc[names[0]])
    for n in names:
        if set(acc[n]) != set(methods):
            raise ValueError(f"data set {n} has methods {sorted(acc[n])}, expected {sorted(methods)}.")
    A = np.array([[acc[n][m] for m in methods] for n in names], dtype=np.float64) * 100.0
    best = A.max(axis=1, keepdims=True)
    ratio = np.where(best > 0, A / np.where(best > 0, best, 1.0), 1.0)
    ranks = np.array([_ranks(r) for r in A])
    stats = {}
    for j, m in enumerate(methods):
        stats[m] = {"mean": float(A[:, j].mean()), "std": float(A[:, j].std()),
                    "friedman_rank": float(ranks[:, j].mean()),
                    "p90": float(np.mean(ratio[:, j] >= 0.90) * 100), "p95": float(np.mean(ratio[:, j] >= 0.95) * 100),
                    "pma": float(ratio[:, j].mean() * 100), "pma_std": float(ratio[:, j].std() * 100)}
    return {"n_datasets": len(names), "methods": stats, "accuracy": {n: acc[n] for n in names}}


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table sorted by mean accuracy."""
    rows = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"])
    lines = [f"UCI: {summary['n_datasets']} data sets", "",
             "| method | mean acc. (%) | Friedman rank | P90 (%) | P95 (%) | PMA (%) | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    times = summary.get("time_s_per_method", {})
    for m, s in rows:
        t = f"{times[m]:.0f}" if m in times else ""
        lines.append(f"| {m} | {s['mean']:.2f} ± {s['std']:.2f} | {s['friedman_rank']:.2f} | {s['p90']:.2f} | "
                     f"{s['p95']:.2f} | {s['pma']:.2f} ± {s['pma_std']:.2f} | {t} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    # the first paragraph of the module docstring (the full title, not its first line only)
    description = " ".join(__doc__.split("\n\n")[0].split()) + (
        " Runs that protocol on the data set folders under --data and writes one JSON per data set plus "
        "summary.json / summary.md to --out.")
    p = argparse.ArgumentParser(prog="python -m ntkit.experiments.uci", description=description)
    p.add_argument("--data", required=True, help="folder holding the UCI data set folders (NAME/NAME.txt, ...)")
    p.add_argument("--out", help="output folder (one JSON per data set; resumable); required unless --list")
    p.add_argument("--methods", default="ntk,laplace,gamma_exp,rbf,rf,mlp",
                   help="comma-separated methods to run, from ntk, laplace, gamma_exp, rbf, rf, mlp "
                        "(default: all six; grids in the module docstring of ntkit.experiments.uci)")
    p.add_argument("--datasets", default=None,
                   help="comma-separated subset of data set names (default: every set under --data; see --list)")
    p.add_argument("--list", action="store_true", help="print the data set names found under --data and exit")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (data sets in parallel)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (per worker)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    a = p.parse_args(argv)
    if not Path(a.data).is_dir():
        p.error(f"--data {a.data} is not a directory; point it at the folder holding the UCI data set folders.")
    if a.list:
        names = list_uci_datasets(a.data)
        print("\n".join(names) if names else f"no data set folders (NAME/NAME.txt) under {a.data}")
        return 0
    if a.out is None:
        p.error("the following arguments are required: --out")
    allm = default_methods()
    keys = [k.strip() for k in a.methods.split(",") if k.strip()]
    bad = [k for k in keys if k not in allm]
    if bad:
        p.error(f"unknown methods {bad}; choose from {sorted(allm)}")
    datasets = None
    if a.datasets is not None:
        try:
            datasets = check_uci_datasets(a.data, [n.strip() for n in a.datasets.split(",") if n.strip()])
        except ValueError as err:
            p.error(str(err))
        if not datasets:
            p.error("--datasets lists no data set name; give comma-separated names (see --list) or omit it.")
    t0 = time.perf_counter()
    summary = run_uci(a.data, a.out, methods={k: allm[k] for k in keys}, datasets=datasets,
                      progress=not a.no_progress, jobs=a.jobs, torch_threads=a.threads)
    print(summary_markdown(summary))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
