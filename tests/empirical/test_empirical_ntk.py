"""Every empirical-NTK implementation against brute-force autograd (one backward per output and sample),
on a zoo of models, to 1e-10 in float64; and bad input leaves the model exactly as it was."""

import pytest
import torch
from torch import nn

import ntkit
from ntkit import MemoryBudgetError
from ntkit.empirical import empirical_ntk

IMPLS = ("jacobian", "ntk_vector", "structured", "auto")
pytestmark = pytest.mark.usefixtures("single_thread")


def brute_force_ntk(model, x1, x2, names, kwargs=None):
    """Theta_ab(x, x') = sum_p df_a(x)/dp df_b(x')/dp, one autograd.grad call per sample and output."""
    kwargs = kwargs or {}
    params = dict(model.named_parameters())

    def jac(x):
        n = x.shape[0]
        k = model(x[:1], **kwargs).reshape(1, -1).shape[1]
        rows = torch.zeros(n, k, sum(params[nm].numel() for nm in names), dtype=torch.float64)
        for i in range(n):
            for a in range(k):
                out = model(x[i:i + 1], **kwargs).reshape(1, -1)[0, a]
                grads = torch.autograd.grad(out, [params[nm] for nm in names], allow_unused=True)
                rows[i, a] = torch.cat([(g if g is not None else torch.zeros_like(params[nm])).reshape(-1)
                                        for g, nm in zip(grads, names)])
        return rows

    return torch.einsum("iap,jbp->ijab", jac(x1), jac(x2))


class Tied(nn.Module):
    """The same Linear applied twice, and a Parameter shared by two Linears (tied weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)
        self.b.weight = nn.Parameter(torch.randn(2, 6))
        self.a.bias = self.inp.bias  # tied bias across modules

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        h = torch.tanh(self.shared(h)) + self.a(h)
        return self.b(h)


class WithKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, *, scale=1.0, shift=None):
        h = torch.relu(self.l1(x) * scale)
        return self.l2(h) + (0 if shift is None else shift)


class SeqModel(nn.Module):
    """Linear over a sequence dimension (weights shared over positions) and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4 * 5, 2)

    def forward(self, x):  # x: (n, 2, 5)
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (n, 5, 3)
        h = torch.relu(self.lin(h))  # (n, 5, 4)
        return self.out(h.reshape(h.shape[0], -1))


class WeightReused(nn.Module):
    """A Linear's weight also used outside the module's own call, directly and transposed."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.l(x)) + torch.tanh(x @ self.l.weight)
        return self.o(h + torch.tanh(h @ self.l.weight.T))


class Routed(nn.Module):
    """A weight used through its Linear for some samples and directly (x @ W^T) for others."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(torch.tanh(torch.where(x[:, :1] > 0, self.l(x), x @ self.l.weight.T)))


class Attention(nn.Module):
    """nn.MultiheadAttention calls its out_proj Linear's weight through F.linear (no forward hook)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.o = nn.Linear(4 * 3, 2)

    def forward(self, x):  # x: (n, 12) -> a sequence of 3 tokens of width 4
        t = x.reshape(x.shape[0], 3, 4)
        return self.o(self.att(t, t, t, need_weights=False)[0].reshape(x.shape[0], -1))


class BatchNotFirst(nn.Module):
    """A Linear that sees (positions, batch, features): the batch is not its first axis."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        t = x.reshape(x.shape[0], 5, 3).transpose(0, 1)
        return self.o(torch.tanh(self.l(t)).mean(0))


def _zoo():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x_flat = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64))
    mlp = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    multi = nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, 3)).double()
    cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2, stride=2),
                        nn.ReLU(), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)).double()
    x_img = (torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64),
             torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64))
    bn = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        bn[1].running_mean.uniform_(-1, 1)
        bn[1].running_var.uniform_(0.5, 2.0)
    bn.eval()
    frozen = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2)).double()
    for p in frozen[0].parameters():
        p.requires_grad_(False)
    tied = Tied().double()
    x_tied = (torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64))
    kw = WithKwargs().double()
    x_kw = (torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64))
    seq = SeqModel().double()
    x_seq = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(2, 2, 5, generator=g, dtype=torch.float64))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1,
                                                                            padding_mode="circular"),
                            nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).double()
    reused = WeightReused().double()
    routed = Routed().double()
    x_routed = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64))
    x_routed[0][:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)  # sample 0 uses the Linear
    inplace = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    att = Attention().double().eval()
    x_att = (torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(2, 12, generator=g, dtype=torch.float64))
    bnf = BatchNotFirst().double()
    x_bnf = (torch.randn(4, 15, generator=g, dtype=torch.float64), torch.randn(3, 15, generator=g, dtype=torch.float64))
    # the batch size equals the number of positions (5): the layer's first axis has the batch's length
    x_bnf5 = (torch.randn(5, 15, generator=g, dtype=torch.float64), torch.randn(5, 15, generator=g, dtype=torch.float64))
    ntk_net = ntkit.mlp(2, 12, activation="relu", W_std=1.4, b_std=0.3, input_dim=5).init(seed=0, out_dim=2)
    std_net = ntkit.mlp(2, 12, activation=ntkit.Erf(), W_std=1.2, b_std=0.2, parameterization="standard",
                        fixed_layers=1, input_dim=5).init(seed=1)
    return {
        "mlp": (mlp, x_flat, None, None),
        "multi_output": (multi, x_flat, None, None),
        "cnn_conv2d_pooling": (cnn, x_img, None, None),
        "batchnorm_eval": (bn, x_flat, None, None),
        "frozen_layers": (frozen, x_flat, None, None),
        "tied_weights": (tied, x_tied, None, None),
        "forward_kwargs": (kw, x_kw, None, {"scale": 0.7, "shift": 0.5}),
        "param_subset": (mlp, x_flat, ["2.weight", "4.bias"], None),
        "sequence_conv1d": (seq, x_seq, None, None),
        "grouped_circular_conv": (grouped, x_img, None, None),
        "weight_reused_outside_module": (reused, x_tied, None, None),
        "inplace_relu": (inplace, x_flat, None, None),
        "weight_routed_per_sample": (routed, x_routed, None, None),
        "multihead_attention": (att, x_att, None, None),
        "batch_not_first_axis": (bnf, x_bnf, None, None),
        "batch_not_first_axis_coincident": (bnf, x_bnf5, None, None),
        "ntkit_ntk_param": (ntk_net, x_flat, None, None),
        "ntkit_standard_frozen": (std_net, x_flat, None, None),
    }


ZOO = _zoo()


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_brute_force(name, impl):
    model, (x1, x2), params, kwargs = ZOO[name]
    if impl == "ntk_vector" and name == "multihead_attention":
        # torch's fused attention kernel has no forward-mode AD: a clear error, not a raw one
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            empirical_ntk(model, x1, x2, implementation=impl)
        return
    names = params or [k for k, v in model.named_parameters() if v.requires_grad]
    ref = brute_force_ntk(model, x1, x2, names, kwargs)
    got = empirical_ntk(model, x1, x2, output="full", implementation=impl, params=params, model_kwargs=kwargs)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    # the reduced forms are computed directly (never through the k x k blocks): check them too
    ref_diag = torch.diagonal(ref, dim1=2, dim2=3)
    for output, want in (("diagonal", ref_diag), ("trace", ref_diag.mean(-1))):
        red = empirical_ntk(model, x1, x2, output=output, implementation=impl, params=params, model_kwargs=kwargs)
        assert red.shape == want.shape
        assert float((red - want).abs().max()) <= 1e-10 * float(ref.abs().max()), output
    # symmetric call (x2=None) uses the mirrored blocks
    same = empirical_ntk(model, x1, output="full", implementation=impl, params=params, model_kwargs=kwargs,
                         batch_size=2)
    ref11 = brute_force_ntk(model, x1, x1, names, kwargs)
    assert float((same - ref11).abs().max()) <= 1e-10 * float(ref11.abs().max())


def test_output_forms_and_tied_parameters_counted_once():
    model, (x1, x2), _, _ = ZOO["multi_output"]
    full = empirical_ntk(model, x1, x2, output="full")
    torch.testing.assert_close(empirical_ntk(model, x1, x2, output="diagonal"), torch.diagonal(full, dim1=2, dim2=3))
    torch.testing.assert_close(empirical_ntk(model, x1, x2), torch.diagonal(full, dim1=2, dim2=3).mean(-1))
    tied = ZOO["tied_weights"][0]
    names = [k for k, _ in tied.named_parameters()]
    assert "a.bias" not in names and "inp.bias" in names  # the shared Parameter appears once


def test_train_mode_batchnorm_falls_back_and_is_not_updated():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double().train()
    x = torch.randn(6, 5, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = empirical_ntk(model, x, implementation="auto", output="full")
    b = empirical_ntk(model, x, implementation="jacobian", output="full")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="train-mode BatchNorm"):
        empirical_ntk(model, x, implementation="structured")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics untouched
    assert model.training


class NotATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        return {"out": self.l(x)}


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: v.requires_grad for k, v in model.named_parameters()},
            [m.training for m in model.modules()])


def _assert_unchanged(model, state):
    sd, rg, modes = state
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert {k: v.requires_grad for k, v in model.named_parameters()} == rg
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("case", ["unknown_param", "bad_shape", "not_tensor", "empty", "budget", "bad_option"])
def test_bad_input_raises_and_leaves_model_unchanged(case):
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64)
    state = _state(model)
    if case == "unknown_param":
        with pytest.raises(ValueError, match=r"unknown parameter name\(s\) \['nope'\]"):
            empirical_ntk(model, x, params=["nope", "3.weight"])
    elif case == "bad_shape":
        with pytest.raises(ValueError, match="rejected inputs of shape"):
            empirical_ntk(model, torch.randn(4, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="must match"):
            empirical_ntk(model, x, torch.randn(2, 4, dtype=torch.float64))
    elif case == "not_tensor":
        m2 = NotATensor().double()
        st2 = _state(m2)
        with pytest.raises(TypeError, match="not a tensor"):
            empirical_ntk(m2, x)
        _assert_unchanged(m2, st2)
    elif case == "empty":
        with pytest.raises(ValueError, match="empty"):
            empirical_ntk(model, x[:0])
    elif case == "budget":
        with pytest.raises(MemoryBudgetError, match="more than the budget"):
            empirical_ntk(model, x, implementation="jacobian", memory_budget=100)
    elif case == "bad_option":
        with pytest.raises(ValueError, match="implementation must be one of"):
            empirical_ntk(model, x, implementation="fast")
        with pytest.raises(ValueError, match="output must be one of"):
            empirical_ntk(model, x, output="trace_mean")
    _assert_unchanged(model, state)


class BatchCentred(nn.Module):
    """Eval-mode model whose samples interact: it subtracts the batch mean of a hidden layer."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h - h.mean(0, keepdim=True))


def test_auto_detects_interacting_samples_and_stays_exact():
    """auto must never be wrong: for a batch-coupled model the per-sample fast paths are invalid, so auto
    falls back to whole-batch differentiation and equals J(X) J(X)^T of the batch function; structured
    refuses with a clear error."""
    torch.manual_seed(3)
    model = BatchCentred().double().eval()
    x = torch.randn(5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    j = torch.cat([v.reshape(5, 2, -1) for v in jac.values()], dim=-1)
    ref = torch.einsum("iap,jbp->ijab", j, j)
    got = empirical_ntk(model, x, output="full", implementation="auto")
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    with pytest.raises(ValueError, match="independently"):
        empirical_ntk(model, x, implementation="structured")
    # a per-sample computation would differ: the check is not vacuous
    wrong = empirical_ntk(nn.Sequential(model.l1, nn.Tanh(), model.l2), x, output="full")
    assert float((wrong - ref).abs().max()) > 1e-3 * float(ref.abs().max())


def test_cost_model_orders_the_implementations():
    from ntkit.empirical._ntk import cost_estimate
    # MLP 784-512-512-512-1 on 256 inputs: structured << jacobian, ntk_vector
    p = 784 * 512 + 2 * 512 * 512 + 512 + 3 * 512 + 1
    f = 2 * (784 * 512 + 2 * 512 * 512 + 512)
    w = 2 * (784 + 4 * 512 + 1) + 3 * 512
    costs = {m: cost_estimate(m, 256, 256, 1, p, f, w) for m in ("structured", "jacobian", "ntk_vector")}
    assert costs["structured"] < costs["jacobian"] / 10 and costs["structured"] < costs["ntk_vector"] / 10
    # coupled samples make the whole-batch Jacobian quadratic in n
    assert cost_estimate("jacobian", 256, 256, 1, p, f, w, independent=False) > 10 * costs["jacobian"]


class WhereReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.where(x[:, :1] > 0, self.fc(x), x @ self.fc.weight.T)


class BareAttention(nn.Module):
    """Only an attention layer: its out_proj Linear never runs through its own forward."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        t = x.reshape(x.shape[0], 2, 4)
        return self.att(t, t, t, need_weights=False)[0].reshape(x.shape[0], -1)


class PerSampleLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return torch.cat([self.b(torch.tanh(self.a(x[i:i + 1]))) for i in range(x.shape[0])])


@pytest.mark.parametrize("case", ["routing_beyond_probe", "routing_beyond_probe_x2", "routing_blocks",
                                  "bare_attention", "bias_free_reuse", "per_sample_loop"])
def test_structured_and_auto_stay_exact_when_the_probe_cannot_tell(case):
    """The probe (first 8 rows) sees only the Linear's own call; later rows route the weight elsewhere, so
    each block is checked on its own data. And models where no parameter can take the structured path
    (attention's out_proj, weights reused outside, one-sample-at-a-time loops) fall back instead of failing."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    x[:8, 0] = x[:8, 0].abs() + 0.1
    x[8:, 0] = -x[8:, 0].abs() - 0.1
    kw = {}
    if case.startswith("routing"):
        model = WhereReuse().double()
        x1, x2 = (x, None) if case != "routing_beyond_probe_x2" else (x[:8], x[8:])
        if case == "routing_blocks":
            kw = {"batch_size": 4}
    elif case == "bare_attention":
        model, x1, x2 = BareAttention().double().eval(), torch.randn(5, 8, generator=g, dtype=torch.float64), None
    elif case == "bias_free_reuse":
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 3, bias=False)

            def forward(self, x):
                return self.a(x) + torch.tanh(x @ self.a.weight.T)
        model, x1, x2 = M().double(), x[:5], x[5:7]
    else:
        model, x1, x2 = PerSampleLoop().double(), x[:5], x[5:6]
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    ref = brute_force_ntk(model, x1, x1 if x2 is None else x2, names)
    for impl in ("auto", "structured"):
        got = empirical_ntk(model, x1, x2, output="full", implementation=impl, **kw)
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), impl


class SortByNorm(nn.Module):
    """Sort the batch, process, unsort: samples are independent, but a layer's row p is not sample p."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        o = x.norm(dim=1).argsort()
        return self.out(torch.tanh(self.lin(x[o])))[o.argsort()]


class Experts(nn.Module):
    """Mixture of experts: each expert sees only the samples routed to it."""

    def __init__(self):
        super().__init__()
        self.e0, self.e1 = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        m = x[:, 0] > 0
        out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        out = out.index_put((m.nonzero()[:, 0],), self.e0(x[m]))
        return out.index_put(((~m).nonzero()[:, 0],), self.e1(x[~m]))


class NoGradCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.mid, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        with torch.no_grad():
            c = self.lin(x).abs().mean(1, keepdim=True)
        return self.out(torch.relu(self.mid(torch.relu(self.lin(x) / (1 + c)))))


class KeywordInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(input=x)))


class Clamped(nn.Linear):
    def forward(self, x):
        return super().forward(x).clamp(-0.3, 0.3)


class TupleLinear(nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return y, y.sum()


class WithSubclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.t, self.out = Clamped(4, 5), TupleLinear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.t(torch.tanh(self.c(x)))[0])


@pytest.mark.parametrize("case", ["sort_by_norm", "experts", "no_grad_call", "keyword_input", "subclasses",
                                  "user_hook"])
def test_structured_and_auto_exact_on_models_that_break_its_assumptions(case):
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    if case == "sort_by_norm":
        model, x = SortByNorm().double(), x[:, :3]
        x[0] *= 1e-2  # sample 0 sorts first: a check on sample 0 alone would not notice
    elif case == "experts":
        model = Experts().double()
        x[:8, 0] = x[:8, 0].abs() + 0.1  # the first rows all go to expert 0
        x[8:, 0] = -x[8:, 0].abs() - 0.1
    elif case == "no_grad_call":
        model = NoGradCall().double()
    elif case == "keyword_input":
        model = KeywordInput().double()
    elif case == "subclasses":
        model = WithSubclasses().double()
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        model[0].register_forward_hook(lambda m, i, o: o * 2.0 + 1.0)
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    x1, x2 = x[:11], x[11:]
    ref = brute_force_ntk(model, x1, x2, names)
    for impl in ("auto", "structured", "jacobian"):
        got = empirical_ntk(model, x1, x2, output="full", implementation=impl)
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), impl
    got = empirical_ntk(model, x, output="full", implementation="structured", batch_size=4)
    ref = brute_force_ntk(model, x, x, names)
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


class DeadCall(nn.Module):
    """A recorded call that the output never sees (detached) next to an unrecorded use of the same weight."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        target = self.l1(x).detach()
        h = torch.tanh(torch.nn.functional.linear(x, self.l1.weight) + self.l1.bias)
        return self.l2(h) + 0.1 * target[:, :2]


class ScaledConv(nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        return super()._conv_forward(input, 2.0 * weight, bias)


class ConvNet(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.c, self.o = conv, nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.c(x.reshape(-1, 2, 4, 4))).flatten(1))


class MultiDilation(nn.Module):
    """One convolution shared across calls with different dilation (TridentNet style)."""

    def __init__(self):
        super().__init__()
        self.c, self.o = nn.Conv2d(2, 2, 3), nn.Linear(2 * 6 * 6, 2)

    def forward(self, x):
        h = x.reshape(-1, 2, 6, 6)
        for d in (1, 2):
            self.c.dilation, self.c.padding = (d, d), (d, d)
            h = torch.tanh(self.c(h))
        return self.o(h.flatten(1))


@pytest.mark.parametrize("case", ["dead_call", "conv_forward_override", "multi_dilation"])
def test_structured_exact_when_calls_are_dead_overridden_or_reconfigured(case):
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(10)
    if case == "dead_call":
        model, d = DeadCall().double(), 4
    elif case == "conv_forward_override":
        model, d = ConvNet(ScaledConv(2, 2, 3, padding=1)).double(), 32
    else:
        model, d = MultiDilation().double(), 72
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    for x1, x2, kw in ((x[:5], x[5:], {}), (x, None, {"batch_size": 3})):
        ref = brute_force_ntk(model, x1, x1 if x2 is None else x2, names)
        for impl in ("structured", "auto"):
            got = empirical_ntk(model, x1, x2, output="full", implementation=impl, **kw)
            assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), (impl, kw)


def test_structured_exact_when_a_dense_scale_changes_between_calls_or_is_a_tensor():
    from ntkit.kernels.layers import DenseModule

    net = ntkit.mlp(2, 8, activation="gelu", b_std=0.1, out_dim=3, fixed_layers=1,
                    parameterization="standard").init(seed=1, in_features=6, dtype=torch.float64)
    dense = [m for m in net.modules() if isinstance(m, DenseModule)][-1]

    class Rescaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.inp = dense, nn.Linear(6, 8)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            self.d.weight_scale = 2.0
            a = self.d(h)
            self.d.weight_scale = 0.5
            return a + self.d(h * 0.3)

    g = torch.Generator().manual_seed(11)
    x1, x2 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    model = Rescaled().double()
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    ref = brute_force_ntk(model, x1, x2, names)
    for impl in ("structured", "auto"):
        got = empirical_ntk(model, x1, x2, output="full", implementation=impl)
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), impl
    net2 = ntkit.mlp(1, 8, activation="relu", b_std=0.1, parameterization="standard").init(
        seed=2, in_features=6, dtype=torch.float64)
    d2 = [m for m in net2.modules() if isinstance(m, DenseModule)][0]
    d2.weight_scale = nn.Parameter(torch.tensor(1.7, dtype=torch.float64))
    names = [k for k, v in net2.named_parameters() if v.requires_grad]
    ref = brute_force_ntk(net2, x1, x2, names)
    got = empirical_ntk(net2, x1, x2, output="full")
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
