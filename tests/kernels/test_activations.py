"""Dual kernels of every activation against brute-force 2-D Gauss-Hermite quadrature.

The reference evaluates E[phi(u) phi(v)] and E[phi'(u) phi'(v)] directly on a 160 x 160 tensor
product rule with phi from the layer's own finite function and phi' by autograd, so it is
independent of the closed forms. Smooth activations must agree to 1e-9 relative; those with a kink
(ReLU family, whose derivative jumps, and sign) converge slowly under quadrature and are compared at
the quadrature's own accuracy, estimated from the difference of two rule sizes.
"""

import math

import numpy as np
import pytest
import torch

import ntkit
from conftest import adaptive_gaussian_expectation, derivative, gauss_hermite_2d

SMOOTH = [
    ntkit.Erf(1.3, 0.7, 0.2),
    ntkit.Gelu(),
    ntkit.Sin(1.1, 0.8, 0.3),
    ntkit.Cos(0.9, 1.2, -0.4),
    ntkit.Rbf(0.6),
    ntkit.Exp(0.8, 0.5),
    ntkit.Gaussian(1.2, -0.7),
    ntkit.Monomial(1),
    ntkit.Monomial(2),
    ntkit.Monomial(3),
    ntkit.Monomial(5),
    ntkit.Polynomial((0.3, -1.0, 0.5, 0.25)),
    ntkit.Elementwise("tanh"),
    ntkit.Elementwise(torch.nn.functional.softplus),
    ntkit.Elementwise("silu"),
]
KINKED = [ntkit.Relu(), ntkit.LeakyRelu(0.2), ntkit.Abs(), ntkit.ABRelu(-0.4, 1.7)]

# (var1, var2, correlation): generic, strong correlation, anticorrelation, coincident, antipodal
POINTS = [(0.7, 1.3, 0.35), (1.1, 0.6, 0.97), (0.9, 1.4, -0.8), (1.2, 1.2, 1.0), (0.8, 0.8, -1.0),
          (1.7, 0.4, 0.0)]


def _closed(act, v1, v2, rho):
    cov = rho * math.sqrt(v1 * v2)
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    nngp, dot = act.dual(t(cov), t(v1), t(v2))
    return float(nngp), float(dot)


@pytest.mark.parametrize("act", SMOOTH, ids=repr)
@pytest.mark.parametrize("point", POINTS)
def test_smooth_dual_matches_quadrature(act, point):
    v1, v2, rho = point
    cov = rho * math.sqrt(v1 * v2)
    nngp, dot = _closed(act, v1, v2, rho)
    ref_nngp = gauss_hermite_2d(act.fn, act.fn, v1, v2, cov, deg=160)
    d = derivative(act.fn)
    ref_dot = gauss_hermite_2d(d, d, v1, v2, cov, deg=160)
    assert nngp == pytest.approx(ref_nngp, rel=1e-9, abs=1e-12)
    assert dot == pytest.approx(ref_dot, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("act", KINKED, ids=repr)
@pytest.mark.parametrize("point", POINTS)
def test_kinked_dual_matches_quadrature(act, point):
    v1, v2, rho = point
    cov = rho * math.sqrt(v1 * v2)
    nngp, dot = _closed(act, v1, v2, rho)
    d = derivative(act.fn)
    ests = [(gauss_hermite_2d(act.fn, act.fn, v1, v2, cov, deg=n), gauss_hermite_2d(d, d, v1, v2, cov, deg=n))
            for n in (200, 301)]
    for i, val in enumerate((nngp, dot)):
        a, b = ests[0][i], ests[1][i]
        tol = 20 * abs(a - b) + 1e-9 * max(1.0, abs(b))  # quadrature error estimate, with margin
        assert abs(val - b) <= max(tol, 2e-3 * abs(b) if i == 1 else 1e-4 * abs(b)), (val, a, b)


def test_sign_dual():
    act = ntkit.Sign()
    for v1, v2, rho in POINTS:
        nngp, dot = _closed(act, v1, v2, rho)
        # Sheppard's formula: E[sign(u) sign(v)] = (2/pi) arcsin(rho); derivative taken as 0
        assert nngp == pytest.approx(2 / math.pi * math.asin(rho), abs=1e-14)
        assert dot == 0.0


def test_relu_closed_form_values():
    # arc-cosine kernel (Cho & Saul 2009): E[relu(u) relu(v)] = sqrt(q1 q2)/(2 pi) (sin t + (pi - t) cos t)
    v1, v2, rho = 2.0, 0.5, 0.3
    t = math.acos(rho)
    nngp, dot = _closed(ntkit.Relu(), v1, v2, rho)
    assert nngp == pytest.approx(math.sqrt(v1 * v2) / (2 * math.pi) * (math.sin(t) + (math.pi - t) * rho), rel=1e-14)
    assert dot == pytest.approx((math.pi - t) / (2 * math.pi), rel=1e-14)


def test_elementwise_polynomial_matches_exact_hermite():
    # a polynomial through the quadrature path must equal the exact Hermite expansion
    coef = (0.5, -0.3, 0.8, 0.1)
    exact = ntkit.Polynomial(coef)
    quad = ntkit.Elementwise(lambda x: exact.fn(x))
    cov = torch.tensor([[0.3, -0.9, 1.2]], dtype=torch.float64)
    v1 = torch.tensor([[1.2]], dtype=torch.float64)
    v2 = torch.tensor([[0.9, 1.1, 1.2]], dtype=torch.float64)
    for a, b in zip(exact.dual(cov, v1, v2), quad.dual(cov, v1, v2)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)


def test_elementwise_tanh_accuracy_at_large_variance():
    # The quadrature activation must stay accurate (>= 1e-8 relative) where pre-activation variances are
    # large; there even a 400 x 400 tensor-product Gauss-Hermite rule is off by 1e-6, so the reference is
    # nested adaptive quadrature.
    act = ntkit.Elementwise("tanh")
    sech2 = lambda x: 1 / math.cosh(x) ** 2  # noqa: E731
    for v1, v2, rho in [(4.0, 6.0, 0.5), (8.0, 8.0, 1.0), (5.0, 3.0, -0.95), (20.0, 20.0, 0.99)]:
        nngp, dot = _closed(act, v1, v2, rho)
        assert nngp == pytest.approx(adaptive_gaussian_expectation(math.tanh, math.tanh, v1, v2, rho), rel=1e-9)
        assert dot == pytest.approx(adaptive_gaussian_expectation(sech2, sech2, v1, v2, rho), rel=1e-9)


def test_elementwise_warns_for_nonsmooth_function():
    act = ntkit.Elementwise(torch.relu, deg=200, max_order=40)
    t = torch.tensor([[0.5]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Hermite terms"):
        act.dual(t, t * 2, t * 2)


def test_variance_is_the_diagonal_of_the_dual():
    for act in SMOOTH + KINKED + [ntkit.Sign()]:
        q = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
        diag = act.dual(q, q, q, derivative=False)[0]
        torch.testing.assert_close(act.variance(q), diag, rtol=1e-11, atol=1e-14)


def test_elementwise_accurate_when_the_two_variances_differ():
    """Each variance's Hermite series is carried to one common order: truncating each at its own order
    cuts the cross series at the smaller one (an error up to sqrt(tol) ~ 3e-7 here, not 1e-13)."""
    quad, closed = ntkit.Elementwise("erf"), ntkit.Erf()
    for q1, q2 in ((0.05, 20.0), (20.0, 0.05), (0.3, 7.0)):
        v1, v2 = torch.tensor([q1], dtype=torch.float64), torch.tensor([q2], dtype=torch.float64)
        for r in (0.99, 0.5, -0.9):
            c = r * (v1 * v2).sqrt()
            (n_q, d_q), (n_c, d_c) = quad.dual(c, v1, v2), closed.dual(c.clone(), v1, v2)
            assert abs(float(n_q / n_c) - 1) < 1e-11, (q1, q2, r)
            assert abs(float(d_q / d_c) - 1) < 1e-11, (q1, q2, r)
