"""The recurrent NTK (ntkit.RNN): exact kernel vs Monte Carlo over the finite twin, vs an independent
pair-by-pair reference recursion, variable-length sequences, readouts, stacking, bidirectional layers,
orthogonal initialization, configs and bad input.

Monte Carlo tolerances: over S seeds the sample mean of each kernel entry has standard error SE = sd/sqrt(S)
(CLT); we require |mean - K| <= Z SE + b with Z = 4.5 (Bonferroni over the <= 15 distinct entries of a 5 x 5
kernel at family-wise level ~1e-4, with room for the t-distribution at S - 1 dof) and b = T_max / width *
max|K|, an allowance for the O(depth / width) bias of the mean kernel (the unrolled RNN has depth T_max).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkit
from ntkit import ConfigError
from ntkit.kernels.recurrent import RNN, as_sequences

DATA = Path(__file__).resolve().parents[1] / "data"

Z = 4.5
D = 3


def _seqs(lengths=(3, 6, 4, 6, 1), d=D, seed=3):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(t, d, generator=g, dtype=torch.float64) for t in lengths]
    if len(seqs) > 3 and len(seqs[1]) >= 3 and len(seqs[3]) >= 3:
        seqs[3][-3:] = seqs[1][-3:]  # same last steps, different starts
    return seqs


def _arch(act=None, readout="last", bidirectional=False, stack=1, parameterization="ntk", width=None,
          b_std=0.4):
    act = ntkit.Erf() if act is None else act
    layers = [RNN(width, W_std=1.3, U_std=1.1, b_std=b_std, activation=act, readout="sequence",
                  bidirectional=bidirectional) for _ in range(stack - 1)]
    layers.append(RNN(width, W_std=1.3, U_std=1.1, b_std=b_std, activation=act, readout=readout,
                      bidirectional=bidirectional))
    return ntkit.serial(*layers, ntkit.Dense(None if width is None else 1, W_std=1.2, b_std=0.2),
                        parameterization=parameterization)


def _empirical(net, seqs):
    """(NNGP sample, NTK sample) of one finite network: mean over readout units of f f^T, and J J^T of
    output 0 by brute-force autograd, one backward pass per sequence."""
    params = [p for p in net.parameters() if p.requires_grad]
    f = net(seqs)
    nngp = (f @ f.T / f.shape[1]).detach()
    rows = []
    for i in range(len(seqs)):
        grads = torch.autograd.grad(f[i, 0], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params)]))
    j = torch.stack(rows)
    return nngp, j @ j.T


def _monte_carlo(arch, seqs, width=512, seeds=16, init="gaussian", out_dim=8):
    samples = [_empirical(arch.init(width, seed=s, init=init, in_features=D, out_dim=out_dim), seqs)
               for s in range(seeds)]
    out = {}
    for i, name in enumerate(("nngp", "ntk")):
        stack = torch.stack([s[i] for s in samples])
        out[name] = (stack.mean(0), stack.std(0) / math.sqrt(seeds))
    return out


def _assert_mc(exact, mc, width, t_max):
    for name in ("nngp", "ntk"):
        k = getattr(exact, name)
        mean, se = mc[name]
        tol = Z * se + t_max / width * k.abs().max()
        worst = float(((mean - k).abs() - tol).max())
        assert worst <= 0, (name, (mean - k).abs().max(), tol.min())


# --------------------------------------------------------------------------------------------------
# An independent reference: the recursion written out pair by pair, time pair by time pair
# --------------------------------------------------------------------------------------------------
def _ref_layer(rnn, kin, tin, qa, qb, std):
    """Grids K, K' Theta (Ta x Tb) of one direction, by explicit loops; qa, qb: Var g_t of either side."""
    ta, tb = kin.shape
    h = np.zeros((ta + 1, tb + 1))
    ht = np.zeros((ta + 1, tb + 1))
    w2, u2, b2 = rnn.W_std**2, rnn.U_std**2, rnn.b_std**2
    a_h, a_in, a_b = std if std is not None else (w2, u2, b2)
    for t in range(1, ta + 1):
        for s in range(1, tb + 1):
            sigma = w2 * h[t - 1, s - 1] + u2 * kin[t - 1, s - 1] + b2
            theta = (a_h * h[t - 1, s - 1] + a_in * kin[t - 1, s - 1] + a_b + w2 * ht[t - 1, s - 1]
                     + u2 * tin[t - 1, s - 1])
            e, de = rnn.activation.dual(torch.tensor(sigma), torch.tensor(qa[t - 1]), torch.tensor(qb[s - 1]))
            h[t, s], ht[t, s] = float(e), float(de) * theta
    return h[1:, 1:], ht[1:, 1:]


def _reference(arch, seqs, widths=None):
    """Kernels (nngp, ntk) of a sequence architecture, pair by pair (no vectorisation, no alignment tricks)."""
    xs = [s.numpy() for s in seqs]
    stack = [lay for lay in arch.layers if isinstance(lay, RNN)]
    rest = ntkit.Serial([lay for lay in arch.layers if not isinstance(lay, RNN)])
    n = len(xs)
    d = xs[0].shape[1]
    kin = {(i, j): xs[i] @ xs[j].T / d for i in range(n) for j in range(n)}
    tin = {key: np.zeros_like(v) for key, v in kin.items()}
    dims = [d] + [r.features for r in stack]
    for li, rnn in enumerate(stack):
        std = None if arch.parameterization == "ntk" else (rnn.out_dim, dims[li], 1.0)
        outs = {}
        for flip in ([False, True] if rnn.bidirectional else [False]):
            f = (lambda g: g[::-1, ::-1]) if flip else (lambda g: g)
            # self variances first: Var g_t(x_i) is the diagonal of the pair (i, i), computed with itself
            q = {}
            for i in range(n):
                ki, ti = f(kin[i, i]), f(tin[i, i])
                qi = np.zeros(ki.shape[0])
                hv = 0.0
                for t in range(ki.shape[0]):
                    qi[t] = rnn.W_std**2 * hv + rnn.U_std**2 * ki[t, t] + rnn.b_std**2
                    hv = float(rnn.activation.variance(torch.tensor(qi[t])))
                q[i] = qi
            for key in kin:
                h, ht = _ref_layer(rnn, f(kin[key]), f(tin[key]), q[key[0]], q[key[1]], std)
                outs.setdefault(key, []).append((f(h), f(ht)))
        kin = {key: sum(o[0] for o in v) / len(v) for key, v in outs.items()}
        tin = {key: sum(o[1] for o in v) / len(v) for key, v in outs.items()}
    top = stack[-1]

    def read(g):
        return g[-1, -1] if top.readout == "last" else g.mean()

    if top.readout == "last" and top.bidirectional:
        # per direction: the forward RNN's last step is (T-1, T'-1); the backward RNN's (in original order) is (0, 0)
        k = {key: sum(o[0][-1, -1] if not fl else o[0][0, 0] for o, fl in zip(v, [False, True])) / 2
             for key, v in outs.items()}
        t = {key: sum(o[1][-1, -1] if not fl else o[1][0, 0] for o, fl in zip(v, [False, True])) / 2
             for key, v in outs.items()}
    else:
        k = {key: read(v) for key, v in kin.items()}
        t = {key: read(v) for key, v in tin.items()}
    nngp = torch.tensor([[k[i, j] for j in range(n)] for i in range(n)])
    ntk = torch.tensor([[t[i, j] for j in range(n)] for i in range(n)])
    var = torch.diagonal(nngp).clone()
    from ntkit.kernels._state import KernelState
    from ntkit.kernels.layers import KernelContext
    st = rest.apply_kernel(KernelState(nngp=nngp, ntk=ntk, var1=var[:, None], var2=var[None, :],
                                       width=top.features, gaussian=False), KernelContext(arch.parameterization))
    return st.nngp, st.ntk


CASES = {
    "erf-last": dict(act=ntkit.Erf(), readout="last"),
    "relu-last": dict(act=ntkit.Relu(), readout="last"),
    "erf-mean": dict(act=ntkit.Erf(), readout="mean"),
    "relu-mean": dict(act=ntkit.Relu(), readout="mean"),
    "erf-last-bidirectional": dict(act=ntkit.Erf(), readout="last", bidirectional=True),
    "relu-mean-bidirectional": dict(act=ntkit.Relu(), readout="mean", bidirectional=True),
    "erf-stack2-last": dict(act=ntkit.Erf(), readout="last", stack=2),
    "relu-stack2-mean-bidirectional": dict(act=ntkit.Relu(), readout="mean", stack=2, bidirectional=True),
    "erf-stack2-last-bidirectional": dict(act=ntkit.Erf(), readout="last", stack=2, bidirectional=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_recursion(case):
    arch = _arch(**CASES[case])
    seqs = _seqs()
    k = arch.kernel(seqs)
    nngp, ntk = _reference(arch, seqs)
    torch.testing.assert_close(k.nngp, nngp, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-11, atol=1e-12)
    # x2 given (no symmetry shortcut), pairwise diagonal, and a block size that splits the tiles
    seqs2 = _seqs(lengths=(5, 2), seed=11)
    full = arch.kernel(seqs + seqs2, get="ntk")
    torch.testing.assert_close(arch.kernel(seqs, seqs2, get="ntk", block_size=2), full[:5, 5:], rtol=1e-12,
                               atol=1e-13)
    torch.testing.assert_close(arch.kernel(seqs + seqs2, get="ntk", diagonal=True), torch.diagonal(full),
                               rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(arch.kernel(seqs, seqs[::-1], get="ntk", diagonal=True),
                               torch.diagonal(full[:5, :5].flip(1)), rtol=1e-12, atol=1e-13)


def test_standard_parameterization_matches_reference():
    arch = _arch(act=ntkit.Erf(), readout="mean", stack=2, parameterization="standard", width=64)
    seqs = _seqs()
    k = arch.kernel(seqs)
    nngp, ntk = _reference(arch, seqs)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(k.nngp, nngp, rtol=1e-11, atol=1e-12)
    with pytest.raises(ConfigError, match="out_dim"):
        _arch(parameterization="standard").kernel(seqs)


# --------------------------------------------------------------------------------------------------
# Monte Carlo over the finite twin
# --------------------------------------------------------------------------------------------------
MC_CASES = ["erf-last", "relu-mean", "erf-mean", "erf-last-bidirectional", "erf-stack2-last",
            pytest.param("relu-stack2-mean-bidirectional", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", MC_CASES)
def test_monte_carlo_converges(case, single_thread):
    arch = _arch(**CASES[case])
    seqs = _seqs()
    exact = arch.kernel(seqs)
    mc = _monte_carlo(arch, seqs, seeds=12 if "stack" in case else 16)
    _assert_mc(exact, mc, 512, 6)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal"])
def test_monte_carlo_orthogonal_and_standard(init, single_thread):
    """Orthogonal weights (W, U Haar-orthogonal) have the same limit (Huang et al. 2021); the standard
    parameterization's NTK at the twin's width."""
    arch = _arch(act=ntkit.Relu(), readout="last")
    seqs = _seqs()
    _assert_mc(arch.kernel(seqs), _monte_carlo(arch, seqs, init=init), 512, 6)
    if init == "gaussian":
        std = _arch(act=ntkit.Erf(), readout="mean", parameterization="standard")
        exact = std.kernel(seqs, width=512)
        _assert_mc(exact, _monte_carlo(std, seqs, seeds=12), 512, 6)


def test_error_falls_like_inverse_sqrt_width(single_thread):
    """Mean over 4 seeds of each twin's RMS kernel error at widths 64, 256, 1024, for Gaussian and orthogonal
    weights, of the net's NTK and of the NNGP of the RNN's own features h h^T / n: every series falls, and the
    common log-log slope (pooled over the four series, which averages their seed noise) is -1/2 within 0.2;
    each series' own slope lies within 0.35 of -1/2 (4 seeds leave it a standard error of ~0.1)."""
    seqs = _seqs()
    arch = _arch(act=ntkit.Erf(), readout="last")
    feats = ntkit.serial(RNN(None, W_std=1.3, U_std=1.1, b_std=0.4, activation=ntkit.Erf()))
    exact_ntk = arch.kernel(seqs, get="ntk")
    exact_feat = feats.kernel(seqs, get="nngp")
    widths = [64, 256, 1024]
    series = []
    for init in ("gaussian", "orthogonal"):
        err_ntk, err_feat = [], []
        for w in widths:
            e1, e2 = [], []
            for s in range(4):
                net = arch.init(w, seed=s, init=init, in_features=D, out_dim=1)
                e1.append(float((_empirical(net, seqs)[1] - exact_ntk).pow(2).mean().sqrt()))
                fnet = feats.init(w, seed=100 + s, init=init, in_features=D)
                with torch.no_grad():
                    h = fnet(seqs)
                e2.append(float((h @ h.T / w - exact_feat).pow(2).mean().sqrt()))
            err_ntk.append(np.mean(e1))
            err_feat.append(np.mean(e2))
        series += [err_ntk, err_feat]
    logw = np.log(widths)
    slopes = [np.polyfit(logw, np.log(errs), 1)[0] for errs in series]
    for errs, slope in zip(series, slopes):
        assert errs[0] > errs[1] > errs[2], series
        assert -0.85 < slope < -0.15, slopes
    # pooled slope: one line per series (own intercept), one common slope
    centred = [np.log(errs) - np.log(errs).mean() for errs in series]
    x = logw - logw.mean()
    pooled = sum(float(c @ x) for c in centred) / (len(series) * float(x @ x))
    assert -0.7 < pooled < -0.3, (pooled, slopes)


# --------------------------------------------------------------------------------------------------
# Properties, inputs, configs
# --------------------------------------------------------------------------------------------------
def test_equal_length_tensor_numpy_and_list_inputs_agree():
    arch = _arch(readout="mean", bidirectional=True)
    seqs = _seqs(lengths=(5, 5, 5))
    ref = arch.kernel(seqs)
    x = torch.stack(seqs)
    torch.testing.assert_close(arch.kernel(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(arch.kernel(x.numpy()), ref, rtol=0, atol=0)
    torch.testing.assert_close(arch.kernel([s.numpy() for s in seqs]), ref, rtol=0, atol=0)
    net = arch.init(16, in_features=D, out_dim=2)
    torch.testing.assert_close(net(x), net(seqs))
    # ntkit.empirical_ntk runs on the finite twin and agrees with the brute-force autograd used above
    net1 = arch.init(16, in_features=D, out_dim=1)
    torch.testing.assert_close(ntkit.empirical_ntk(net1, x), _empirical(net1, seqs)[1], rtol=1e-12, atol=1e-13)


def test_finite_twin_variable_lengths_match_one_by_one():
    """The padded batch gives each sequence exactly what it gets alone (padding never leaks)."""
    for kw in (dict(readout="last"), dict(readout="mean", bidirectional=True),
               dict(readout="last", stack=2, bidirectional=True)):
        arch = _arch(**kw)
        net = arch.init(32, seed=1, in_features=D, out_dim=3)
        seqs = _seqs()
        with torch.no_grad():
            batch = net(seqs)
            for i, s in enumerate(seqs):
                torch.testing.assert_close(batch[i], net([s])[0], rtol=1e-13, atol=1e-13)


def test_last_readout_only_sees_the_tail_alignment():
    """With "last", k(x, x') depends on the aligned tails: prefixing a sequence with steps changes it, while the
    kernel of identical tails of different lengths is below the self-kernels and positive semi-definite."""
    arch = _arch(readout="last")
    seqs = _seqs()
    k = arch.kernel(seqs, get="ntk")
    torch.testing.assert_close(k, k.T, rtol=0, atol=0)
    assert float(torch.linalg.eigvalsh(k).min()) > -1e-10
    longer = [torch.cat([torch.randn(4, D, dtype=torch.float64), seqs[0]])]
    assert not torch.allclose(arch.kernel(longer, seqs[:1], get="ntk"), arch.kernel(seqs[:1], seqs[:1], get="ntk"))


def test_memory_budget_and_float32():
    arch = _arch(readout="mean")
    seqs = _seqs()
    ref = arch.kernel(seqs, get="ntk")
    small = arch.kernel(seqs, get="ntk", memory_budget=20_000)
    torch.testing.assert_close(small, ref, rtol=1e-12, atol=1e-13)
    with pytest.raises(ntkit.MemoryBudgetError, match="memory budget"):
        arch.kernel(seqs, memory_budget=1_000)
    f32 = arch.kernel(seqs, get="ntk", dtype=torch.float32)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), ref, rtol=1e-5, atol=1e-6)


def test_real_variable_length_sequences():
    """JapaneseVowels (12 features, lengths 17-26): the kernel of real sequences matches the reference
    recursion and is a valid (PSD) kernel under which same-speaker pairs are the most similar."""
    z = np.load(DATA / "sequences" / "japanese_vowels_small.npz")
    seqs = [torch.from_numpy(z["values"][i, : z["lengths"][i]]) for i in range(len(z["lengths"]))]
    arch = ntkit.serial(RNN(W_std=1.0, U_std=1.0, b_std=0.1, activation=ntkit.Erf(), readout="mean"),
                        ntkit.Dense(1, W_std=1.0, b_std=0.0))
    k = arch.kernel(seqs)
    nngp, ntk = _reference(arch, seqs[1:4])
    torch.testing.assert_close(k.ntk[1:4, 1:4], ntk, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(k.nngp[1:4, 1:4], nngp, rtol=1e-11, atol=1e-12)
    assert float(torch.linalg.eigvalsh(k.ntk).min()) > 0
    c = k.ntk / torch.sqrt(torch.outer(torch.diagonal(k.ntk), torch.diagonal(k.ntk)))
    labels = z["labels"]
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if j != i]
        nearest = max(others, key=lambda j: float(c[i, j]))
        assert labels[nearest] == labels[i], (i, nearest)


def test_config_round_trip():
    arch = _arch(act=ntkit.LeakyRelu(0.1), readout="mean", bidirectional=True, stack=2, width=16)
    cfg = arch.to_config()
    assert cfg["layers"][0] == {"layer": "rnn", "out_dim": 16, "W_std": 1.3, "U_std": 1.1, "b_std": 0.4,
                                "activation": {"layer": "leaky_relu", "alpha": 0.1}, "readout": "sequence",
                                "bidirectional": True}
    back = ntkit.from_config(json.dumps(cfg))
    assert back == arch
    seqs = _seqs()
    torch.testing.assert_close(back.kernel(seqs), arch.kernel(seqs), rtol=0, atol=0)
    minimal = ntkit.from_config({"layers": [
        {"layer": "rnn", "W_std": 1.0, "U_std": 1.0, "b_std": 0.0, "activation": {"layer": "relu"}},
        {"layer": "dense", "W_std": 1.0, "b_std": 0.0}]})
    assert minimal.layers[0] == RNN(None, 1.0, 1.0, 0.0, ntkit.Relu(), "last", False)
    with pytest.raises(ConfigError, match="U_std"):
        ntkit.from_config({"layers": [{"layer": "rnn", "W_std": 1, "b_std": 0, "activation": {"layer": "erf"}}]})
    with pytest.raises(ConfigError, match="readout"):
        ntkit.from_config({"layers": [{"layer": "rnn", "W_std": 1, "U_std": 1, "b_std": 0,
                                       "activation": {"layer": "relu"}, "readout": "first"}]})
    with pytest.raises(ConfigError, match="activation"):
        ntkit.from_config({"layers": [{"layer": "rnn", "W_std": 1, "U_std": 1, "b_std": 0,
                                       "activation": {"layer": "dense", "W_std": 1, "b_std": 0}}]})


def test_widths_and_stack_errors():
    arch = _arch(stack=2)
    net = arch.init([8, 16], in_features=D, out_dim=2)
    assert net.body[0].forward_rnn.weight.shape == (8, 8)
    assert net.body[1].forward_rnn.weight.shape == (16, 16)
    assert net.body[1].forward_rnn.input_weight.shape == (16, 8)
    assert net(_seqs()).shape == (5, 2)
    with pytest.raises(ConfigError, match="width lists"):
        arch.init([8], in_features=D)
    seqs = _seqs()
    bad_top = ntkit.serial(RNN(readout="sequence"), ntkit.Dense(1))
    with pytest.raises(ConfigError, match="readout='sequence'"):
        bad_top.kernel(seqs)
    lower_not_sequence = ntkit.serial(RNN(readout="last"), RNN(), ntkit.Dense(1))
    with pytest.raises(ConfigError, match="needs readout='sequence'"):
        lower_not_sequence.kernel(seqs)
    not_first = ntkit.serial(ntkit.Dense(4), RNN(), ntkit.Dense(1))
    with pytest.raises(ConfigError, match="first layer"):
        not_first.kernel(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="Gaussian pre-activations"):
        ntkit.serial(RNN(), ntkit.Relu(), ntkit.Dense(1)).kernel(seqs)


@pytest.mark.parametrize("where", ["kernel", "network"])
def test_bad_sequences_name_the_sample(where):
    arch = _arch()
    net = arch.init(8, in_features=D, out_dim=1)
    run = (lambda x: arch.kernel(x)) if where == "kernel" else (lambda x: net(x))
    seqs = _seqs()
    with pytest.raises(ValueError, match="no sequences"):
        run([])
    empty = seqs[:2] + [torch.zeros(0, D, dtype=torch.float64)]
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        run(empty)
    mixed = seqs[:3] + [torch.randn(4, D + 1, dtype=torch.float64)]
    with pytest.raises(ValueError, match="sequence 3 has 4 features per time step but sequence 0 has 3"):
        run(mixed)
    nan = [s.clone() for s in seqs]
    nan[4][0, 1] = float("nan")
    nan[1][5, 0] = float("nan")
    with pytest.raises(ValueError, match="sequence 1 contains NaN at time step 5"):
        run(nan)
    with pytest.raises(ValueError, match=r"\(n, T, d\)"):
        run(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        run([np.ones((3, D), dtype=np.int64)])
    if where == "kernel":
        with pytest.raises(ValueError, match="x2 sequences have 4 features"):
            arch.kernel(seqs, [torch.randn(3, D + 1, dtype=torch.float64)])
        with pytest.raises(ValueError, match="x2 sequence 0 contains Inf at time step 1"):
            arch.kernel(seqs, [torch.tensor([[0.0] * D, [float("inf")] * D], dtype=torch.float64)])
        with pytest.raises(ValueError, match="input_dim=5"):
            ntkit.serial(RNN(), ntkit.Dense(1), input_dim=5).kernel(seqs)


# --------------------------------------------------------------------------------------------------
# The public API on sequences: kernel options, kernel_fn, empirical NTK / NNGP and Monte Carlo of the twin
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(readout="mean"), dict(readout="last"), dict(readout="last", bidirectional=True)])
def test_kernel_options_and_kernel_fn_on_sequences(kw, monkeypatch):
    arch = _arch(**kw)
    seqs, seqs2 = _seqs(), _seqs(lengths=(5, 2), seed=11)
    ref = arch.kernel(seqs, seqs2)
    kf = arch.kernel_fn("ntk")
    torch.testing.assert_close(kf(seqs, seqs2), ref.ntk, rtol=0, atol=0)
    torch.testing.assert_close(arch.kernel_fn("nngp")(seqs), arch.kernel(seqs, get="nngp"), rtol=0, atol=0)
    torch.testing.assert_close(kf(seqs, diagonal=True), torch.diagonal(arch.kernel(seqs, get="ntk")), rtol=1e-12,
                               atol=1e-13)
    assert kf(seqs, dtype=torch.float32).dtype == torch.float32
    # memory budget (tiles of single pairs), dtype, device and progress give the same numbers
    small = arch.kernel(seqs, seqs2, memory_budget=30_000, device="cpu")
    torch.testing.assert_close(small.ntk, ref.ntk, rtol=1e-12, atol=1e-13)
    calls = []
    import ntkit.kernels.recurrent as rec

    def spy(it, **opts):
        calls.append(opts.get("enabled"))
        return it

    monkeypatch.setattr(rec, "progress", spy)
    arch.kernel(seqs, get="ntk", progress=True)  # a bar over the kernel's tiles
    assert True in calls
    calls.clear()
    arch.kernel(seqs, get="ntk", progress=False)
    assert calls and not any(calls)


def test_empirical_ntk_nngp_and_monte_carlo_of_the_twin_on_variable_lengths(single_thread):
    """ntkit.empirical_ntk / empirical_nngp take the finite twin and a list of sequences of different lengths
    (x2 with another longest length too) and agree with brute-force autograd per sequence, by every
    implementation; ntkit.monte_carlo_kernel takes the architecture and the sequences (or an (n, T, d) tensor)
    and its mean is the mean of those per-seed kernels."""
    arch = _arch(readout="mean", bidirectional=True)
    seqs, seqs2 = _seqs(), _seqs(lengths=(8, 2), seed=11)
    net = arch.init(12, seed=0, in_features=D, out_dim=1)
    nngp, ntk = _empirical(net, seqs + seqs2)
    for impl in ("auto", "jacobian", "ntk_vector", "structured"):
        torch.testing.assert_close(ntkit.empirical_ntk(net, seqs, implementation=impl), ntk[:5, :5], rtol=1e-12,
                                   atol=1e-13)
        torch.testing.assert_close(ntkit.empirical_ntk(net, seqs, seqs2, implementation=impl), ntk[:5, 5:],
                                   rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ntkit.empirical_nngp(net, seqs, seqs2), nngp[:5, 5:], rtol=1e-12, atol=1e-13)
    seqs_padded = ntkit.Sequences(*as_sequences(seqs))
    torch.testing.assert_close(ntkit.empirical_ntk(net, seqs_padded), ntk[:5, :5], rtol=1e-12, atol=1e-13)

    mc = ntkit.monte_carlo_kernel(arch, seqs, seqs2, width=12, seeds=3, out_dim=1)
    per_seed = [_empirical(arch.init(12, seed=s, in_features=D, out_dim=1), seqs + seqs2) for s in range(3)]
    torch.testing.assert_close(mc["ntk"].mean, torch.stack([p[1][:5, 5:] for p in per_seed]).mean(0), rtol=1e-12,
                               atol=1e-13)
    torch.testing.assert_close(mc["nngp"].mean, torch.stack([p[0][:5, 5:] for p in per_seed]).mean(0),
                               rtol=1e-12, atol=1e-13)
    equal = _seqs(lengths=(4, 4, 4))
    mc_t = ntkit.monte_carlo_kernel(arch, torch.stack(equal), width=12, seeds=2, get="ntk")
    torch.testing.assert_close(mc_t.mean, ntkit.monte_carlo_kernel(arch, equal, width=12, seeds=2, get="ntk").mean,
                               rtol=0, atol=0)


@pytest.mark.parametrize("where", ["empirical_ntk", "empirical_nngp", "monte_carlo_kernel", "kernel_fn"])
def test_bad_sequences_name_the_sample_everywhere(where):
    arch = _arch()
    net = arch.init(8, in_features=D, out_dim=1)
    run = {"empirical_ntk": lambda x: ntkit.empirical_ntk(net, x),
           "empirical_nngp": lambda x: ntkit.empirical_nngp(net, x),
           "monte_carlo_kernel": lambda x: ntkit.monte_carlo_kernel(arch, x, width=8, seeds=2),
           "kernel_fn": lambda x: arch.kernel_fn("ntk")(x)}[where]
    seqs = _seqs()
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        run(seqs[:2] + [torch.zeros(0, D, dtype=torch.float64)])
    with pytest.raises(ValueError, match="sequence 3 has 4 features per time step but sequence 0 has 3"):
        run(seqs[:3] + [torch.randn(4, D + 1, dtype=torch.float64)])
    nan = [s.clone() for s in seqs]
    nan[1][5, 0] = float("nan")
    with pytest.raises(ValueError, match="sequence 1 contains NaN at time step 5"):
        run(nan)
