"""Command line interface: ``ntkit <command>`` (also ``python -m ntkit <command>``).

Commands
--------
demo       the five pictures of NTK theory, measured on handwritten digits, as one HTML report
kernel     exact NNGP/NTK of an architecture config on inputs from .npy/.npz/.csv files
predict    predictions of the infinitely wide net trained by gradient flow (MSE or cross-entropy)
spectrum   eigenvalues, condition number, convergence times and Mercer decay of a kernel
empirical  empirical NTK of a model (TorchScript file or ``module:function`` that builds it)
uci        the UCI-90 benchmark protocol of Arora et al. 2020 (ntkit.experiments.uci)
report     render report.html again from a results folder (results.json + PNGs)
reproduce  paper reproductions (ntkit.experiments.reproduce)

Every command that produces results accepts ``--out DIR`` and then writes ``results.json``, its
figures as PNG and a self-contained ``report.html`` there (:mod:`ntkit.report`). User mistakes
(missing file, bad config, wrong shapes, bad option) end with one line on stderr and exit status 2;
set ``NTKIT_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main", "UsageError"]


class UsageError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# helpers shared by the commands
def _load_array(spec: str, what: str) -> np.ndarray:
    """An array from ``file.npy``, ``file.npz`` (its only array, or ``file.npz:key``) or ``file.csv``."""
    path, key = spec, None
    if ":" in spec and not Path(spec).exists():
        path, key = spec.rsplit(":", 1)
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: file {path} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                if key is None:
                    if len(names) != 1:
                        raise UsageError(f"{what}: {path} holds arrays {names}; choose one with {path}:NAME")
                    key = names[0]
                if key not in names:
                    raise UsageError(f"{what}: {path} has no array {key!r} (it holds {names})")
                arr = z[key]
        elif suffix in (".csv", ".txt"):
            try:
                arr = np.loadtxt(p, delimiter="," if suffix == ".csv" else None, ndmin=2)
            except ValueError:  # a header line
                arr = np.loadtxt(p, delimiter="," if suffix == ".csv" else None, ndmin=2, skiprows=1)
            if arr.shape[1] == 1:
                arr = arr[:, 0]
        else:
            raise UsageError(f"{what}: {path} has an unknown extension; use .npy, .npz or .csv")
    except UsageError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{what}: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise UsageError(f"{what}: {path} does not hold numbers (dtype {arr.dtype})")
    return arr


def _load_config(path: str):
    from .kernels import from_config

    if not Path(path).is_file():
        raise UsageError(f"--config: file {path} not found")
    try:
        return from_config(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--config {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


def _dtype(name: str | None, default: str = "float64"):
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name or default]


def _device(name: str | None):
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _times(spec: str) -> list[float]:
    out = []
    for tok in spec.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        try:
            t = math.inf if tok in ("inf", "infinity") else float(tok)
        except ValueError:
            raise UsageError(f"--times: {tok!r} is not a number; give comma-separated times like 0,10,100,inf") \
                from None
        if not t >= 0:
            raise UsageError(f"--times: {tok} is negative; times are >= 0")
        out.append(t)
    if not out:
        raise UsageError("--times is empty; give comma-separated times like 0,10,100,inf")
    return out


def _out_paths(out: str | None, default_file: str) -> tuple[Path, Path | None]:
    """``--out`` is a folder (arrays + results.json + report.html) or, ending in .npz, the array file only."""
    if out is None:
        return Path(default_file), None
    if out.endswith(".npz"):
        return Path(out), None
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / default_file, folder


def _seed(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)


def _figure(figsize=(6.4, 4.0)):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _config_report(title: str, intro: str, results: dict, folder: Path, figures=()) -> Path:
    from .report import Report

    rep = Report(title, intro=intro)
    rep.update(results)
    for fig, name, caption in figures:
        rep.figure(fig, name, caption)
    return rep.save(folder)


# ---------------------------------------------------------------------------------------------------
# commands
def _demo(args) -> int:
    from .experiments.demo import run_demo

    if args.mnist is not None and not Path(args.mnist).exists():
        raise UsageError(f"--mnist: {args.mnist} not found; give a folder with the MNIST IDX files or an .npz with "
                         "'images' and 'labels' (or omit it for scikit-learn's bundled digits)")
    _seed(args)
    path = run_demo(args.out, mnist=args.mnist, quick=args.quick, seed=args.seed,
                    progress_flag=False if args.no_progress else None, threads=args.threads,
                    device=_device(args.device), net_dtype=_dtype(args.dtype, "float32"),
                    log=lambda s: print(s, flush=True))
    print(path.resolve())
    return 0


def _kernel(args) -> int:
    arch = _load_config(args.config)
    x1 = _load_array(args.x1, "--x1")
    x2 = _load_array(args.x2, "--x2") if args.x2 else None
    get = tuple(g.strip() for g in args.get.split(",") if g.strip())
    bad = [g for g in get if g not in ("nngp", "ntk")]
    if bad or not get:
        raise UsageError(f"--get {args.get!r}: choose from nngp, ntk (comma-separated)")
    if x1.ndim < 2 or (x2 is not None and x2.ndim < 2):
        raise UsageError(f"inputs must be 2-d (n, d) arrays; --x1 has shape {x1.shape}"
                         + ("" if x2 is None else f", --x2 has shape {x2.shape}"))
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise UsageError(f"--x1 rows have shape {x1.shape[1:]} but --x2 rows have shape {x2.shape[1:]}; they must match")
    if args.store:
        return _kernel_to_store(args, arch, x1, x2, get)
    file, folder = _out_paths(args.out, "kernels.npz")
    t0 = time.perf_counter()
    k = arch.kernel(x1, x2, get, dtype=_dtype(args.dtype), device=_device(args.device))
    dt = time.perf_counter() - t0
    arrays = {name: getattr(k, name).cpu().numpy() for name in get}
    np.savez(file, **arrays)
    print(f"wrote {file}: {', '.join(f'{g} {arrays[g].shape}' for g in get)} in {dt:.3f} s")
    if folder is not None:
        results = {"command": "kernel", "config": arch.to_config(), "n1": int(x1.shape[0]),
                   "n2": int(x1.shape[0] if x2 is None else x2.shape[0]), "time_s": dt, "arrays": file.name,
                   **{f"{g}_diag_mean": float(np.mean(np.diagonal(arrays[g]))) if x2 is None else
                      float(np.mean(arrays[g])) for g in get}}
        figs = []
        for g in get:
            fig = _figure((5.2, 4.2))
            ax = fig.subplots()
            im = ax.imshow(arrays[g], cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax, label=f"{g.upper()} value")
            ax.set_xlabel("input index (x2)" if x2 is not None else "input index j")
            ax.set_ylabel("input index (x1)" if x2 is not None else "input index i")
            ax.grid(False)
            figs.append((fig, g, f"Exact infinite-width {g.upper()} matrix."))
        path = _config_report("ntkit kernel", f"Exact kernels of the architecture in {args.config} on {args.x1}"
                              + (f" and {args.x2}" if args.x2 else "") + ".", results, folder, figs)
        print(path)
    return 0


def _kernel_to_store(args, arch, x1, x2, get) -> int:
    """``ntkit kernel --store DIR``: one resumable zarr store per kernel (DIR/nngp.zarr, DIR/ntk.zarr)."""
    from pathlib import Path

    from .store import store_kernel

    if args.out:
        raise UsageError("--store and --out both name an output; give one (--store writes zarr stores)")
    root = Path(args.store)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--store {root} exists and is not a folder; name a folder for the zarr stores")
    root.mkdir(parents=True, exist_ok=True)
    for g in get:
        t0 = time.perf_counter()
        arr = store_kernel(arch.kernel_fn(g), x1, x2, path=root / f"{g}.zarr", dtype=_dtype(args.dtype),
                           memory_budget=args.memory_budget, scheduler=args.scheduler,
                           progress=not args.no_progress)
        print(f"wrote {root / (g + '.zarr')}: {g} {tuple(arr.shape)} {arr.dtype} in {time.perf_counter() - t0:.3f} s "
              "(zarr; resumable: the same command finishes an interrupted store)")
    return 0


def _predict(args) -> int:
    import torch

    from .dynamics import gradient_descent, gradient_descent_mse

    arch = _load_config(args.config)
    x_train = _load_array(args.x_train, "--x-train")
    y_train = _load_array(args.y_train, "--y-train")
    x_test = _load_array(args.x_test, "--x-test")
    y_test = _load_array(args.y_test, "--y-test") if args.y_test else None
    times = _times(args.times)
    if x_train.ndim < 2 or x_test.ndim < 2:
        raise UsageError(f"inputs must be 2-d (n, d) arrays; --x-train has shape {x_train.shape}, --x-test "
                         f"{x_test.shape}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UsageError(f"--x-train rows have shape {x_train.shape[1:]} but --x-test rows {x_test.shape[1:]}")
    if y_train.shape[0] != x_train.shape[0]:
        raise UsageError(f"--y-train has {y_train.shape[0]} rows but --x-train has {x_train.shape[0]}")
    if y_test is not None and y_test.shape[0] != x_test.shape[0]:
        raise UsageError(f"--y-test has {y_test.shape[0]} rows but --x-test has {x_test.shape[0]}")
    labels_train = None
    if args.loss == "cross_entropy" and y_train.ndim == 1:  # class labels -> one-hot
        if not np.all(y_train == np.round(y_train)) or y_train.min() < 0:
            raise UsageError("--y-train: cross-entropy needs class labels 0..C-1 (1-d) or one-hot rows (2-d)")
        labels_train = y_train.astype(int)
        y_train = np.eye(int(labels_train.max()) + 1)[labels_train]
    dt_ = _dtype(args.dtype)
    dev = _device(args.device)
    t0 = time.perf_counter()
    k = arch.kernel(x_train, get=args.kernel, dtype=dt_, device=dev)
    k_test = arch.kernel(x_test, x_train, get=args.kernel, dtype=dt_, device=dev)
    if args.loss == "mse":
        predictor = gradient_descent_mse(k, y_train, learning_rate=args.learning_rate, diag_reg=args.diag_reg)
    else:
        if any(math.isinf(t) for t in times):
            raise UsageError("--times: cross-entropy has no t = inf limit (the outputs grow without bound); "
                             "give finite times")
        predictor = gradient_descent(args.loss, k, y_train, learning_rate=args.learning_rate,
                                     diag_reg=args.diag_reg)
    pred = predictor.predict(times, k_test)
    dt = time.perf_counter() - t0
    file, folder = _out_paths(args.out, "predictions.npz")
    test, train = pred.test.cpu().numpy(), pred.train.cpu().numpy()
    np.savez(file, times=np.asarray(times), test=test, train=train)
    print(f"wrote {file}: {args.kernel} predictions ({args.loss}) on {len(x_test)} test points at {len(times)} "
          f"times ({dt:.3f} s; loss normalised by y.size, learning rate {args.learning_rate})")
    if folder is not None:
        results: dict[str, Any] = {"command": "predict", "config": arch.to_config(), "loss": args.loss,
                                   "kernel": args.kernel, "times": times, "learning_rate": args.learning_rate,
                                   "diag_reg": args.diag_reg, "time_s": dt, "arrays": file.name}
        figs = []
        if y_test is not None:
            yt = torch.as_tensor(y_test, dtype=torch.float64)
            tt = torch.as_tensor(test)
            if tt.ndim == 2:
                tt = tt[..., None]
            if yt.ndim == 1 and tt.shape[-1] > 1:  # class labels
                acc = [float((f.argmax(-1) == yt.long()).double().mean()) for f in tt]
                results["test_accuracy"] = acc
                metric, name = [100 * a for a in acc], "test accuracy (%)"
            else:
                yt = yt.reshape(tt.shape[1], -1)
                mse = [float(((f - yt) ** 2).mean()) for f in tt]
                results["test_mse"] = mse
                metric, name = mse, "test mean squared error"
            fin = [(t, m) for t, m in zip(times, metric) if math.isfinite(t) and t > 0]
            if fin:
                fig = _figure()
                ax = fig.subplots()
                ax.plot([t for t, _ in fin], [m for _, m in fin], "o-", label=f"{args.kernel.upper()} dynamics")
                for t, m in zip(times, metric):
                    if math.isinf(t):
                        ax.axhline(m, color="k", ls="--", label="t = ∞ (kernel regression)")
                ax.set_xscale("log")
                ax.set_xlabel("training time t (steps of size η)")
                ax.set_ylabel(name)
                ax.legend()
                figs.append((fig, "test_metric_vs_time", f"{name} of the infinite-width network over training"))
        path = _config_report("ntkit predict", f"Infinite-width {args.kernel.upper()} predictions of the network in "
                              f"{args.config}, trained on {args.loss}.", results, folder, figs)
        print(path)
    return 0


def _spectrum(args) -> int:
    import torch

    from .spectra import (condition_number, convergence_times, decay_exponent, effective_rank, eigendecomposition,
                          mercer_eigenvalues)

    if (args.kernel_file is None) == (args.config is None):
        raise UsageError("give either --config (with --x) or --kernel-file (a precomputed (n, n) kernel matrix)")
    arch = None
    if args.config is not None:
        arch = _load_config(args.config)
        if args.x is None and args.mercer_d is None:
            raise UsageError("--config needs --x (inputs) or --mercer-d (Mercer eigenvalues on the sphere)")
    results: dict[str, Any] = {"command": "spectrum"}
    figs = []
    lam = None
    if args.kernel_file is not None or args.x is not None:
        if args.kernel_file is not None:
            k = _load_array(args.kernel_file, "--kernel-file").astype(np.float64)
            if k.ndim != 2 or k.shape[0] != k.shape[1]:
                raise UsageError(f"--kernel-file must hold a square (n, n) matrix, got shape {k.shape}")
            k = torch.as_tensor(k)
            source = args.kernel_file
        else:
            x = _load_array(args.x, "--x")
            if x.ndim < 2:
                raise UsageError(f"--x must be a 2-d (n, d) array, got shape {x.shape}")
            k = arch.kernel(x, get=args.get, dtype=_dtype(args.dtype), device=_device(args.device)).cpu()
            source = f"{args.get.upper()} of {args.config} on {args.x}"
        n = k.shape[0]
        spec = eigendecomposition(k, args.top_k)
        lam = spec.eigenvalues
        kappa = condition_number(k)
        tau = convergence_times(k, learning_rate=args.learning_rate, n_targets=n * args.outputs)
        results.update(source=source, n=n, eigenvalues=lam, condition_number=kappa, effective_rank=effective_rank(k),
                       convergence_times=tau[: lam.numel()], learning_rate=args.learning_rate)
        print(f"{source}: n = {n}, lambda_max = {float(lam[0]):.6g}, lambda_min = {float(lam[-1]):.6g}, "
              f"condition number = {kappa:.6g}, effective rank = {results['effective_rank']:.4g}")
        print(f"convergence times m/(eta lambda_i) (eta = {args.learning_rate}, m = {n * args.outputs}): "
              + ", ".join(f"{float(t):.4g}" for t in tau[:5]) + (" ..." if n > 5 else ""))
        fig = _figure((9.5, 3.8))
        ax1, ax2 = fig.subplots(1, 2)
        idx = np.arange(1, lam.numel() + 1)
        ax1.loglog(idx, lam.clamp_min(1e-300).numpy(), "o-", ms=3)
        ax1.set_xlabel("eigenvalue index i")
        ax1.set_ylabel(r"eigenvalue $\lambda_i$")
        ax1.set_title(f"spectrum (condition number {kappa:.3g})")
        fin = torch.isfinite(tau[: lam.numel()])
        ax2.loglog(idx[fin.numpy()], tau[: lam.numel()][fin].numpy(), "o-", ms=3, color="C1")
        ax2.set_xlabel("eigenvalue index i")
        ax2.set_ylabel(r"convergence time $m / (\eta \lambda_i)$ (steps)")
        ax2.set_title("time to learn each kernel principal component")
        figs.append((fig, "spectrum", "Eigenvalues of the kernel matrix and the MSE gradient-flow time constants."))
    if args.mercer_d is not None:
        if arch is None:
            raise UsageError("--mercer-d needs --config (the Mercer eigenvalues are those of an architecture)")
        ms = mercer_eigenvalues(arch, d=args.mercer_d, k_max=args.mercer_kmax, get=args.get)
        mlam = ms.eigenvalues.numpy()
        tiny = 1e-12 * float(np.abs(mlam).max())
        try:
            fit = decay_exponent(ms, k_max=_last_positive(mlam, tiny))
            parity = None
        except ValueError:  # bias-free ReLU kernels: odd eigenvalues vanish above degree 1
            parity = "even"
            fit = decay_exponent(ms, k_max=_last_positive(mlam, tiny), parity=parity)
        expo = fit.exponent
        results["mercer"] = {"d": args.mercer_d, "eigenvalues": mlam, "decay_exponent": expo,
                             "decay_stderr": fit.stderr, "parity": parity}
        print(f"Mercer eigenvalues on S^{args.mercer_d - 1}: decay exponent {expo:.4g}")
        fig = _figure((5.5, 3.8))
        ax = fig.subplots()
        mk = np.arange(len(mlam))
        pos = (mlam > tiny) & (mk > 0)
        ax.loglog(mk[pos], mlam[pos], "o", ms=3, label="Mercer eigenvalue")
        kk = np.asarray(fit.degrees, float)
        ax.loglog(kk, np.exp(fit.intercept) * kk ** expo, "--", color="k", label=f"fit: k^{expo:.2f}")
        ax.set_xlabel("spherical-harmonic degree k")
        ax.set_ylabel(r"eigenvalue $\mu_k$")
        ax.set_title(f"Mercer decay on $S^{{{args.mercer_d - 1}}}$: exponent {expo:.3g}")
        ax.legend()
        figs.append((fig, "mercer", "Funk-Hecke (Mercer) eigenvalues of the architecture's kernel on the sphere."))
    file, folder = _out_paths(args.out, "spectrum.npz")
    arrays = {}
    if lam is not None:
        arrays.update(eigenvalues=lam.numpy(), convergence_times=results["convergence_times"].numpy())
    if "mercer" in results:
        arrays["mercer_eigenvalues"] = results["mercer"]["eigenvalues"]
    np.savez(file, **arrays)
    print(f"wrote {file}")
    if folder is not None:
        print(_config_report("ntkit spectrum", "Spectral diagnostics of a kernel (Jacot et al. 2018, Sec. 5).",
                             results, folder, figs))
    return 0


def _last_positive(lam: np.ndarray, tiny: float) -> int:
    """The highest degree before the eigenvalues fall to rounding level (quadrature noise)."""
    pos = np.nonzero(lam > tiny)[0]
    return int(pos[-1]) if pos.size else len(lam) - 1


def _load_model(spec: str):
    import torch

    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ts", ".jit") or p.is_file():
        if not p.is_file():
            raise UsageError(f"--model: file {spec} not found")
        try:
            return torch.jit.load(str(p), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"--model {spec} is not a TorchScript file ({str(exc).splitlines()[0]}); save one "
                             "with torch.jit.script(model).save(path), or give module:function") from None
    if ":" not in spec:
        raise UsageError(f"--model {spec!r}: give a TorchScript file or module:function (a function that returns "
                         "an nn.Module, e.g. mypkg.models:build)")
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise UsageError(f"--model {spec}: cannot import module {mod_name!r} ({exc})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise UsageError(f"--model {spec}: module {mod_name!r} has no function {fn_name!r}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec}: {fn_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _script_ntk(model, x1, x2, output: str, params):
    """Empirical NTK of a TorchScript module from its Jacobian, one reverse-mode pass per output entry.

    torch.func cannot swap the parameters of a TorchScript module, so :func:`ntkit.empirical_ntk`
    does not apply; this is the plain definition Theta_ab(x, x') = <df_a(x)/dtheta, df_b(x')/dtheta>
    (Jacot et al. 2018, Eq. (3)), for models small enough to hold the Jacobian.
    """
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (params is None or n in params)]
    if params is not None and len(named) != len(set(params)):
        missing = sorted(set(params) - {n for n, _ in named})
        raise UsageError(f"--params: the model has no trainable parameters {missing}")
    plist = [p for _, p in named]
    n_par = sum(p.numel() for p in plist)

    def jac(x):
        out = model(x)
        f = out.reshape(x.shape[0], -1)
        n, k = f.shape
        if n * k * n_par * f.element_size() > 2e9:
            raise UsageError(f"the Jacobian of this TorchScript model ({n} x {k} outputs x {n_par} parameters) "
                             "does not fit in 2 GB; give the model as module:function instead")
        rows = []
        for i in range(n):
            for a in range(k):
                g = torch.autograd.grad(f[i, a], plist, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                       for gi, p in zip(g, plist)]))
        return torch.stack(rows).reshape(n, k, n_par)

    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if output == "full":
        return full
    diag = torch.diagonal(full, dim1=2, dim2=3)
    return diag if output == "diagonal" else diag.mean(-1)


def _empirical(args) -> int:
    import torch

    from .empirical import empirical_ntk

    _seed(args)  # a module:function that builds a random model gets the same model for the same --seed
    model = _load_model(args.model)
    model = model.to(dtype=_dtype(args.dtype))
    dev = _device(args.device)
    if dev is not None:
        model = model.to(dev)
    x1 = _load_array(args.x1, "--x1")
    x2 = _load_array(args.x2, "--x2") if args.x2 else None
    if x2 is not None and x1.shape[1:] != x2.shape[1:]:
        raise UsageError(f"--x1 rows have shape {x1.shape[1:]} but --x2 rows have shape {x2.shape[1:]}; they must match")
    params = [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None
    t0 = time.perf_counter()
    t1 = torch.as_tensor(x1, dtype=_dtype(args.dtype), device=dev)
    t2 = None if x2 is None else torch.as_tensor(x2, dtype=_dtype(args.dtype), device=dev)
    try:
        if isinstance(model, torch.jit.ScriptModule):
            theta = _script_ntk(model, t1, t2, args.output, params)
        else:
            theta = empirical_ntk(model, t1, t2, output=args.output, implementation=args.implementation,
                                  params=params)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"the model failed on inputs of shape {x1.shape}: {str(exc).splitlines()[0]}") from None
    dt = time.perf_counter() - t0
    file, folder = _out_paths(args.out, "empirical_ntk.npz")
    arr = theta.detach().cpu().numpy()
    np.savez(file, ntk=arr)
    print(f"wrote {file}: empirical NTK ({args.output}) {arr.shape} in {dt:.3f} s")
    if folder is not None:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        results = {"command": "empirical", "model": args.model, "shape": list(arr.shape), "output": args.output,
                   "implementation": args.implementation, "parameters": n_params, "time_s": dt, "arrays": file.name}
        figs = []
        if arr.ndim == 2:
            fig = _figure((5.2, 4.2))
            ax = fig.subplots()
            im = ax.imshow(arr, cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax, label="empirical NTK value")
            ax.set_xlabel("input index j")
            ax.set_ylabel("input index i")
            ax.grid(False)
            figs.append((fig, "empirical_ntk", "Empirical NTK (mean over output units)."))
        print(_config_report("ntkit empirical", f"Empirical NTK of {args.model} ({n_params} trainable parameters).",
                             results, folder, figs))
    return 0


def _report(args) -> int:
    from .report import Report

    src = Path(args.results)
    if not src.exists():
        raise UsageError(f"{args.results} not found; give a folder with results.json (and PNGs) or a results.json")
    rep = Report.from_folder(src, title=args.title)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    if out.resolve() != (src if src.is_dir() else src.parent).resolve():
        path = rep.save(out)
    else:  # re-render in place: only report.html changes (results.json and PNGs stay as they are)
        path = out / "report.html"
        path.write_text(rep.to_html(), encoding="utf-8")
    print(f"{rep.n_figures} figures, {len(rep.claims)} claims")
    print(path)
    return 0


def _reproduce(argv: list[str]) -> int:
    try:
        mod = importlib.import_module("ntkit.experiments.reproduce")
    except ModuleNotFoundError as exc:
        if exc.name in ("ntkit.experiments.reproduce",):
            raise UsageError("the reproductions (ntkit.experiments.reproduce) are not part of this installation") \
                from None
        raise
    return int(mod.main(argv) or 0)


# ---------------------------------------------------------------------------------------------------
_EXAMPLES = {
    "demo": "example:\n  ntkit demo --out ntkit-demo            # ~2 min; prints the report's path last\n"
            "  ntkit demo --quick --out /tmp/demo     # same stories, reduced size (seconds)\n"
            "  ntkit demo --mnist t10k.npz           # MNIST (.npz with images/labels, or IDX folder)",
    "kernel": "example:\n  ntkit kernel --config arch.json --x1 x.npy --out k.npz\n"
              "  ntkit kernel --config arch.yaml --x1 test.csv --x2 train.npy --get ntk --out results/",
    "predict": "example:\n  ntkit predict --config arch.json --x-train xtr.npy --y-train ytr.npy --x-test xte.npy \\\n"
               "      --times 0,10,100,inf --out pred.npz\n"
               "  ntkit predict ... --loss cross_entropy --times 1,10,100 --y-test yte.npy --out results/",
    "spectrum": "example:\n  ntkit spectrum --config arch.json --x x.npy --learning-rate 1 --out results/\n"
                "  ntkit spectrum --kernel-file k.npz:ntk\n"
                "  ntkit spectrum --config arch.json --mercer-d 3 --mercer-kmax 50",
    "empirical": "example:\n  ntkit empirical --model model.pt --x1 x.npy --out theta.npz        # TorchScript\n"
                 "  ntkit empirical --model mypkg.models:build --x1 x.npy --output full --out results/",
    "report": "example:\n  ntkit report ntkit-demo                  # re-render ntkit-demo/report.html\n"
              "  ntkit report runs/results.json --out page/ --title 'My run'",
    "uci": "example:\n  ntkit uci --data path/to/uci --out out/uci --jobs 2",
    "reproduce": "example:\n  ntkit reproduce --help",
}


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="ntkit", formatter_class=fmt,
        description="ntkit: the Neural Tangent Kernel toolkit for PyTorch (exact infinite-width kernels, "
                    "empirical NTKs, training dynamics, spectra).",
        epilog="example:\n  ntkit demo                 # the main job: an HTML report with five figures\n"
               "  ntkit kernel --help        # every command has --help with an example")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    common.add_argument("--dtype", default=None, choices=["float64", "float32"],
                        help="float precision (default float64; the demo's trained networks: float32)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    sub = parser.add_subparsers(dest="command", metavar="command")

    def add(name, help_, func):
        p = sub.add_parser(name, help=help_, description=help_, parents=[common], epilog=_EXAMPLES[name],
                           formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    p = add("demo", "the NTK story on handwritten digits: five figures in one self-contained HTML report", _demo)
    p.add_argument("--out", default="ntkit-demo", help="output folder (report.html, results.json, PNGs)")
    p.add_argument("--quick", action="store_true", help="reduced size (seconds; used by the tests)")
    p.add_argument("--mnist", default=None, help="MNIST .npz (images, labels) or IDX folder; default: "
                                                  "scikit-learn's bundled 8x8 digits")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1: small matrices)")

    p = add("kernel", "exact NNGP/NTK of an architecture config on inputs from .npy/.npz/.csv", _kernel)
    p.add_argument("--config", required=True, help="architecture config (.json/.yaml), see arch.to_config()")
    p.add_argument("--x1", required=True, help="inputs (n1, d): .npy, .csv, .npz or file.npz:NAME")
    p.add_argument("--x2", help="second inputs (n2, d); default x1")
    p.add_argument("--get", default="nngp,ntk", help="nngp, ntk or both (comma-separated)")
    p.add_argument("--store", default=None, help="folder for out-of-core zarr stores (one per kernel, tile by tile, "
                   "resumable) instead of an .npz; needs zarr")
    p.add_argument("--memory-budget", type=float, default=None, help="bytes for tiles in flight with --store")
    p.add_argument("--scheduler", default=None, help="with --store: 'local' (a Dask LocalCluster) or a scheduler "
                   "address")
    p.add_argument("--out", default=None, help="FILE.npz for the arrays, or a folder (arrays + results.json + "
                                               "report.html); default kernels.npz")

    p = add("predict", "predictions of the infinitely wide net trained by gradient flow, at any times", _predict)
    p.add_argument("--config", required=True, help="architecture config (.json/.yaml)")
    p.add_argument("--x-train", required=True, help="training inputs (n, d)")
    p.add_argument("--y-train", required=True, help="training targets (n,) or (n, k); class labels for cross-entropy")
    p.add_argument("--x-test", required=True, help="test inputs (m, d)")
    p.add_argument("--y-test", default=None, help="test targets or labels (optional; adds loss/accuracy to --out)")
    p.add_argument("--times", default="inf", help="comma-separated times, 'inf' for kernel regression (MSE)")
    p.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"], help="training loss")
    p.add_argument("--kernel", default="ntk", choices=["ntk", "nngp"], help="ntk: all layers trained; nngp: readout")
    p.add_argument("--learning-rate", type=float, default=1.0, help="eta (default 1)")
    p.add_argument("--diag-reg", type=float, default=0.0, help="relative diagonal regularizer")
    p.add_argument("--out", default=None, help="FILE.npz or a folder (default predictions.npz)")

    p = add("spectrum", "eigenvalues, condition number, convergence times and Mercer decay of a kernel", _spectrum)
    p.add_argument("--config", default=None, help="architecture config (.json/.yaml)")
    p.add_argument("--x", default=None, help="inputs (n, d) for the kernel matrix of --config")
    p.add_argument("--kernel-file", default=None, help="a precomputed (n, n) kernel matrix instead of --config/--x")
    p.add_argument("--get", default="ntk", choices=["ntk", "nngp"], help="which kernel of --config")
    p.add_argument("--top-k", type=int, default=None, help="only the top k eigenpairs")
    p.add_argument("--learning-rate", type=float, default=1.0, help="eta for the convergence times")
    p.add_argument("--outputs", type=int, default=1, help="outputs per sample (m = n * outputs)")
    p.add_argument("--mercer-d", type=int, default=None, help="input dimension d: Mercer eigenvalues on S^(d-1)")
    p.add_argument("--mercer-kmax", type=int, default=50, help="highest spherical-harmonic degree")
    p.add_argument("--out", default=None, help="FILE.npz or a folder (default spectrum.npz)")

    p = add("empirical", "empirical NTK of a model (TorchScript file or module:function)", _empirical)
    p.add_argument("--model", required=True, help="TorchScript file (.pt) or module:function returning an nn.Module")
    p.add_argument("--x1", required=True, help="inputs (n1, ...)")
    p.add_argument("--x2", default=None, help="second inputs (n2, ...); default x1")
    p.add_argument("--output", default="trace", choices=["trace", "full", "diagonal"],
                   help="trace: (n1, n2) mean over outputs; full: (n1, n2, k, k); diagonal: (n1, n2, k)")
    p.add_argument("--implementation", default="auto", choices=["auto", "jacobian", "ntk_vector", "structured"])
    p.add_argument("--params", default=None, help="comma-separated parameter names (default: all trainable)")
    p.add_argument("--out", default=None, help="FILE.npz or a folder (default empirical_ntk.npz)")

    p = add("report", "render report.html again from a results folder (results.json + PNGs)", _report)
    p.add_argument("results", help="a folder written with --out, or a results.json")
    p.add_argument("--out", default=None, help="write the report into this folder instead (default: in place)")
    p.add_argument("--title", default=None, help="page title (default: the recorded one)")

    sub.add_parser("uci", help="UCI-90 protocol of Arora et al. 2020 (see: ntkit uci --help)")
    sub.add_parser("reproduce", help="paper reproductions (see: ntkit reproduce --help)")
    return parser


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "uci":  # hand every remaining option to the UCI runner's own parser
        from .experiments import uci

        return int(uci.main(argv[1:]) or 0)
    if argv and argv[0] == "reproduce":
        return _reproduce(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ntkit`` / ``python -m ntkit``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = argv[0] if argv else ""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(f"ntkit {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user mistakes: one line, no traceback
        from ._validation import ConfigError, MemoryBudgetError

        try:
            from .report import ReportError
        except ImportError:  # pragma: no cover
            ReportError = UsageError
        user = (UsageError, ConfigError, MemoryBudgetError, ReportError, FileNotFoundError, ValueError,
                json.JSONDecodeError)
        if os.environ.get("NTKIT_TRACEBACK") or not isinstance(exc, user):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ntkit {cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
