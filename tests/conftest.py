"""Shared test helpers: reference cases, brute-force Gaussian expectations."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
REFERENCE_DIR = DATA / "reference"


@pytest.fixture(autouse=True, scope="session")
def native_cache(tmp_path_factory):
    """Native loops (ntkit.kernels._native) are built into a temporary cache, not the user's ~/.cache/ntkit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NTKIT_CACHE_DIR", str(tmp_path_factory.mktemp("ntkit-cache")))
        yield


def images_with_parallel_pair(shape, seed, pair, factor, dtype=torch.float64):
    """Random channels-last images in which image ``pair[1]`` is ``factor`` times image ``pair[0]``: their
    correlation is exactly 1 at every position pair, which the kernels must keep (snapped, not rounded)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[pair[1]] = x[pair[0]] * factor
    return x


def reference_cases():
    """(name, npz path) of the neural-tangents reference cases stored in tests/data/reference."""
    return [(p.stem, p) for p in sorted(REFERENCE_DIR.glob("*.npz"))]


def load_reference(path):
    z = np.load(path)
    return json.loads(str(z["config"])), z


def gauss_hermite_2d(f, g, var1, var2, cov, deg=120):
    """Brute-force E[f(u) g(v)] for (u, v) ~ N(0, [[var1, cov], [cov, var2]]) by a deg x deg
    tensor-product Gauss-Hermite rule (independent of the library's implementation)."""
    from scipy.special import roots_hermitenorm

    z, w = roots_hermitenorm(deg)
    w = w / math.sqrt(2 * math.pi)
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    ww = np.outer(w, w)
    s1 = math.sqrt(var1)
    rho = 0.0 if var1 * var2 == 0 else cov / math.sqrt(var1 * var2)
    rho = max(-1.0, min(1.0, rho))
    u = s1 * z1
    v = math.sqrt(var2) * (rho * z1 + math.sqrt(max(0.0, 1 - rho * rho)) * z2)
    fu = f(torch.as_tensor(u)).numpy()
    gv = g(torch.as_tensor(v)).numpy()
    return float((ww * fu * gv).sum())


def adaptive_gaussian_expectation(f, g, var1, var2, rho):
    """E[f(u) g(v)] by nested adaptive quadrature (scipy.integrate.quad) over the conditional
    decomposition v = sqrt(var2) (rho z1 + sqrt(1 - rho^2) z2): slow, accurate, independent."""

    from scipy import integrate

    s1, s2, c = math.sqrt(var1), math.sqrt(var2), math.sqrt(max(0.0, 1 - rho * rho))
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    opts = dict(epsabs=1e-15, epsrel=1e-13, limit=400)

    def inner(z1):
        if c == 0:
            return g(s2 * rho * z1)
        return integrate.quad(lambda z2: g(s2 * (rho * z1 + c * z2)) * phi(z2), -40, 40, **opts)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return integrate.quad(lambda z1: f(s1 * z1) * inner(z1) * phi(z1), -40, 40, **opts)[0]


def derivative(fn):
    """Elementwise derivative of a torch function by autograd."""

    def d(x):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(x).sum(), x)
        return g.detach()

    return d


def assert_fused_equals_eager(arch, x, x2, dtype, eager=None):
    """``arch.kernel(x, x2, fused=True)`` (compiled) equals the eager ``fused=False`` result (1e-12 in float64,
    2e-5 in float32); skips the test where torch.compile cannot run. ``eager``: an optional context manager
    around the eager reference call (e.g. one that switches a compiled path off)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = arch.kernel(x, x2, dtype=dtype, fused=True)
    failed = [str(w.message) for w in caught if "using eager torch" in str(w.message)]
    if failed:
        pytest.skip(f"torch.compile is not available on this machine: {failed[0]}")
    with eager if eager is not None else contextlib.nullcontext():
        want = arch.kernel(x, x2, dtype=dtype, fused=False)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for u, v in zip(want, got):
        torch.testing.assert_close(v, u, rtol=tol, atol=tol * float(u.abs().max()))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def single_thread():
    """One torch thread for the test: multi-threaded LAPACK oversubscribes the shared 2-core machine under load
    (eigvalsh of 800 x 800 took 12 s with 2 threads vs 0.07 s with 1); the numbers do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def local_cluster_spy(monkeypatch):
    """Record every ``distributed.LocalCluster`` the code under test starts, as (kwargs, scheduler address,
    number of workers); the clusters themselves are real."""
    distributed = pytest.importorskip("distributed")
    started = []
    real = distributed.LocalCluster

    def spy(**kw):
        cluster = real(**kw)
        started.append((kw, cluster.scheduler_address, len(cluster.workers)))
        return cluster

    monkeypatch.setattr(distributed, "LocalCluster", spy)
    return started
