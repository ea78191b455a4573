"""linearize(): training the linearized network with torch optimizers follows the kernel dynamics of its
empirical NTK (computed here independently from full torch.func Jacobians)."""

import copy

import pytest
import torch
from torch.func import functional_call, jacrev

import ntkit
from ntkit.dynamics import gradient_descent, gradient_descent_mse, linearize

DT = torch.float64


def empirical_ntk(model, x1, x2):
    """sum_p df(x1)/dp df(x2)/dp for a single-output model, from materialized Jacobians (test oracle)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(pr, x):
        return functional_call(model, pr, (x,))[:, 0]

    j1, j2 = jacrev(f)(params, x1), jacrev(f)(params, x2)
    return sum(j1[n].reshape(x1.shape[0], -1) @ j2[n].reshape(x2.shape[0], -1).T for n in params)


class TwoCopies(torch.nn.Module):
    """Two outputs from two copies of one network: the empirical NTK is exactly K (x) I_2."""

    def __init__(self, net):
        super().__init__()
        self.a, self.b = copy.deepcopy(net), copy.deepcopy(net)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    xs = torch.randn(4, 3, generator=g, dtype=DT)
    y = torch.randn(10, 1, generator=g, dtype=DT)
    arch = ntkit.mlp(depth=2, width=48, activation="relu", W_std=1.4, b_std=0.2, out_dim=1, parameterization="ntk")
    net = arch.init(48, seed=3, in_features=3, dtype=torch.float64)
    k, ks = empirical_ntk(net, x, x), empirical_ntk(net, xs, x)
    with torch.no_grad():
        f0, f0s = net(x), net(xs)
    return dict(x=x, xs=xs, y=y, net=net, k=k, ks=ks, f0=f0, f0s=f0s)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def train(model, x, y, xs, lr, steps, momentum=0.0, loss="mse"):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    out = {}
    for s in range(max(steps) + 1):
        if s in steps:
            with torch.no_grad():
                out[s] = (model(x).clone(), model(xs).clone())
        opt.zero_grad()
        f = model(x)
        if loss == "mse":
            val = 0.5 * ((f - y) ** 2).mean()
        elif loss == "hinge":
            val = 0.5 * (torch.clamp(1 - y * f, min=0) ** 2).mean()
        else:
            val = -(y * torch.log_softmax(f, 1)).sum(1).mean()
        val.backward()
        opt.step()
    return out


def test_linearize_is_first_order_taylor(setup):
    lin = linearize(setup["net"])
    with torch.no_grad():
        assert rel(lin(setup["x"]), setup["f0"]) < 1e-14  # theta = theta0
        delta = {n: 1e-3 * torch.randn_like(p) for n, p in lin.params().items()}
        for n, p in lin.params().items():
            p.add_(delta[n])
        params = {n: p.detach() for n, p in setup["net"].named_parameters()}
        jac = jacrev(lambda pr: functional_call(setup["net"], pr, (setup["x"],)))(params)
        want = setup["f0"] + sum((jac[n].reshape(10, 1, -1) @ delta[n].reshape(-1, 1))[..., 0] for n in params)
        assert rel(lin(setup["x"]), want) < 1e-12
    # the original network is untouched
    assert all(p.requires_grad for p in setup["net"].parameters())


def test_linearized_gd_matches_discrete_closed_form(setup):
    s = setup
    lr = 0.5 * 2 * s["y"].numel() / float(torch.linalg.eigvalsh(s["k"])[-1])  # half the stability limit
    steps = [1, 5, 20, 60]
    got = train(linearize(s["net"]), s["x"], s["y"], s["xs"], lr, steps)
    pred = gradient_descent_mse(s["k"], s["y"], learning_rate=lr, discrete=True).predict(
        steps, s["ks"], s["f0"], s["f0s"])
    for i, st in enumerate(steps):
        assert rel(got[st][0], pred.train[i]) < 1e-6
        assert rel(got[st][1], pred.test[i]) < 1e-6


def test_linearized_momentum_matches_closed_form_and_ode(setup):
    s = setup
    lr, beta = 0.5, 0.9
    steps = [1, 10, 40]
    got = train(linearize(s["net"]), s["x"], s["y"], s["xs"], lr, steps, momentum=beta)
    pred = gradient_descent_mse(s["k"], s["y"], learning_rate=lr, discrete=True, momentum=beta).predict(
        steps, s["ks"], s["f0"], s["f0s"])
    for i, st in enumerate(steps):
        assert rel(got[st][0], pred.train[i]) < 1e-6
        assert rel(got[st][1], pred.test[i]) < 1e-6
    # heavy-ball ODE f'' + (1 - beta) f' = -eta K dL/df is the continuum limit: refine by N
    # (steps * N, (1 - beta) / N, eta / N^2 follows the same rescaled ODE); the gap falls ~ 1/N
    t, b0, eta0 = 40, 0.8, 0.5
    errs = []
    for n in (1, 4, 16):
        disc = gradient_descent_mse(s["k"], s["y"], learning_rate=eta0 / n**2, discrete=True,
                                    momentum=1 - (1 - b0) / n).predict(t * n, s["ks"], s["f0"], s["f0s"]).test
        ode = gradient_descent("mse", s["k"], s["y"], learning_rate=eta0 / n**2, momentum=1 - (1 - b0) / n).predict(
            float(t * n), s["ks"], s["f0"], s["f0s"]).test
        errs.append(rel(disc - s["f0s"], ode - s["f0s"]))
    assert errs[1] < errs[0] / 2.5 and errs[2] < errs[1] / 2.5, errs
    assert errs[-1] < 0.02, errs


@pytest.mark.parametrize("loss", ["hinge", "cross_entropy"])
def test_ode_nonlinear_losses_match_small_step_gd(setup, loss):
    """ODE (cross-entropy, quadratic hinge) = small-step GD on the linearized model; the gap is O(eta):
    it must shrink ~4x when the step is cut 4x, and be small at the finest step."""
    s = setup
    model = TwoCopies(s["net"]) if loss == "cross_entropy" else s["net"]
    if loss == "cross_entropy":
        lab = (s["y"][:, 0] > 0).long()
        y = torch.nn.functional.one_hot(lab, 2).double()
        f0, f0s = torch.cat([s["f0"]] * 2, 1), torch.cat([s["f0s"]] * 2, 1)
    else:
        y = torch.sign(s["y"])
        f0, f0s = s["f0"], s["f0s"]
    t_total = 30.0
    ode = gradient_descent(loss, s["k"], y, learning_rate=1.0).predict(t_total, s["ks"], f0, f0s)
    errs = []
    for n in (2, 8):
        got = train(linearize(model), s["x"], y, s["xs"], 1.0 / n, [int(t_total * n)], loss=loss)
        ftr, fte = got[int(t_total * n)]
        errs.append(max(rel(ftr - f0, ode.train - f0), rel(fte - f0s, ode.test - f0s)))
    assert errs[1] < errs[0] / 2.5, errs
    assert errs[1] < 0.01, errs


# ---------------------------------------------------------------- train/eval mode of the base network
def _bn_net(seed=0):
    """Linear -> BatchNorm1d -> Tanh -> Linear with non-trivial running statistics, returned in eval mode."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 2)).double()
    with torch.no_grad():  # a few train-mode passes move running_mean / running_var away from 0 / 1
        for _ in range(3):
            net(3 * torch.randn(32, 4, dtype=DT) + 1)
    return net.eval()


def _taylor_reference(net, x, delta):
    """f(x; theta0) + J(x; theta0) delta of ``net`` (eval mode) from a reverse-mode Jacobian (test oracle)."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        f0 = net(x)
    jac = jacrev(lambda pr: functional_call(net, {**buffers, **pr}, (x,)))(params)
    n, k = f0.shape
    return f0 + sum((jac[name].reshape(n, k, -1) @ delta[name].reshape(-1, 1))[..., 0] for name in params)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_linearize_batchnorm_is_fixed_affine_function_in_any_mode(mode):
    """BatchNorm: lin.train() must neither crash (in-place num_batches_tracked update under jvp) nor update
    the running statistics; the output equals the eval-mode Taylor expansion of the network."""
    net = _bn_net()
    x = torch.randn(10, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    buffers0 = {n: b.clone() for n, b in net.named_buffers()}
    lin = linearize(net)
    getattr(lin, mode)()
    assert not lin.base.training and lin.training == (mode == "train")
    with torch.no_grad():
        assert rel(lin(x), net(x)) < 1e-14  # theta = theta0: the eval-mode network
        delta = {n: 1e-3 * torch.randn_like(p) for n, p in lin.params().items()}
        for n, p in lin.params().items():
            p.add_(delta[n])
        out1 = lin(x)
        out2 = lin(x[:3])  # a different batch must not change the function row-wise (no batch statistics)
    assert rel(out1, _taylor_reference(net, x, delta)) < 1e-12
    assert rel(out2, out1[:3]) < 1e-14
    for n, b in lin.base.named_buffers():  # no running-statistics update, ever
        assert torch.equal(b, buffers0[n]), n
    # gradients flow (a training step works in train mode)
    lin.train()
    loss = (lin(x) ** 2).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lin.parameters() if p.requires_grad)


def test_linearize_dropout_is_deterministic_after_train():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(32, 1)).double().eval()
    x = torch.randn(20, 4, dtype=DT)
    lin = linearize(net).train()
    with torch.no_grad():
        a, b = lin(x), lin(x)
        assert torch.equal(a, b)  # train-mode dropout would differ on (almost surely) every row
        assert rel(a, net(x)) < 1e-14
        lin.base.train()  # even a direct switch of the base does not make the function random
        assert torch.equal(lin(x), a)


@pytest.mark.parametrize("layer", [torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1)])
def test_linearize_refuses_train_mode_networks_whose_function_depends_on_mode(layer):
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), layer, torch.nn.Linear(8, 1)).double()  # train mode
    with pytest.raises(ValueError, match=r"model\.eval\(\)") as err:
        linearize(net)
    assert type(layer).__name__ in str(err.value)
    lin = linearize(net.eval())  # the documented fix
    with torch.no_grad():
        x = torch.randn(5, 3, dtype=DT)
        assert rel(lin(x), net(x)) < 1e-14


def test_linearize_checks_each_submodule_mode():
    """The mode is per module: an eval-mode model with one BatchNorm left in train mode is refused; a train-mode
    model whose mode-dependent layers are all in eval mode (or have no running statistics) is accepted."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)).double().eval()
    net[1].train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        linearize(net)
    net.train()
    net[1].eval()
    linearize(net)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8, track_running_stats=False),
                                torch.nn.Dropout(0.0), torch.nn.Linear(8, 1)).double()  # same function in both modes
    x = torch.randn(6, 3, dtype=DT)
    with torch.no_grad():
        assert rel(linearize(plain).train()(x), plain(x)) < 1e-14
