"""Gradients through the sampler (sample(..., grad=True)): the discrete adjoint and per-step checkpointing.

* Both equal autograd through the unrolled sampler (same solver, grid and noise) to 1e-6 relative in float64, for
  the start noise, conditioning tensors (model_kwargs, guidance cond) and network parameters; on an analytic model
  and on the shipped digits network.
* Peak memory (torch profiler, CPU) of forward + backward for 50 steps is within 1.5x of 5 steps.
* The backward pass re-evaluates the model exactly stats["backward_nfe"] times; a loss that ignores the sample
  gives zero gradients; the adaptive solver is refused with a message naming what works.
"""

import pytest
import torch

import dpmsolve as dp
from counting import Counting
from dpmsolve.inversion import BDIA, EDICT
from dpmsolve.lab import GaussianMixture

SCHEDULE = dp.DiscreteVP.linear()


def unrolled(den, x, solver, steps, model_kwargs=None, seed=0, grid="logSNR", **options):
    """The sampler written out with autograd on: init / ask / tell, nothing else."""
    s = dp.get_solver(solver, **options) if isinstance(solver, str) else solver
    ts = s.grid(den.schedule, steps, grid)
    state = s.init(den.schedule, ts, x, torch.Generator().manual_seed(seed))
    while not s.done(state):
        x_eval, t = s.ask(state)
        state = s.tell(state, den(x_eval, t, **(model_kwargs or {})))
    return s.current(state)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


class CondNet(torch.nn.Module):
    """A small conditional network net(x, t, c) for gradient checks."""

    def __init__(self, dim=3, cond=2):
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1 + cond, 32)
        self.l2 = torch.nn.Linear(32, dim)

    def forward(self, x, t, c):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None] / 1000, c], 1))))


@pytest.fixture
def mixture():
    return GaussianMixture.random(k=4, dim=3, seed=0).denoiser(SCHEDULE)


SOLVERS = [("ddim", {}), ("dpmsolver++", {"order": 2}), ("dpmsolver++", {"order": 3, "solver_type": "taylor"}),
           ("unipc", {}), ("dpmsolver", {"method": "singlestep", "order": 3}), ("sde-dpmsolver++", {}),
           ("ddim", {"eta": 0.5}), ("heun", {})]


@pytest.mark.parametrize("checkpoint", [False, True], ids=["adjoint", "checkpoint"])
@pytest.mark.parametrize("name,options", SOLVERS, ids=[f"{n}{o}" for n, o in SOLVERS])
def test_gradient_equals_unrolled_autograd_on_an_analytic_model(mixture, name, options, checkpoint):
    x = 5 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_(True)
    ref = unrolled(mixture, x_ref, name, 8, **options)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x_ref)
    x_ad = x.clone().requires_grad_(True)
    sol = dp.sample(mixture, x_ad, name, steps=8, seed=0, grad=True, checkpoint=checkpoint, progress=False, **options)
    assert torch.equal(sol.x.detach(), ref.detach())          # the same sample, noise included
    (g,) = torch.autograd.grad((sol.x * w).sum(), x_ad)
    assert g.abs().max() > 0
    assert rel(g, g_ref) < 1e-6
    assert sol.stats["backward_nfe"] == sol.nfe


@pytest.mark.parametrize("checkpoint", [False, True], ids=["adjoint", "checkpoint"])
@pytest.mark.parametrize("name,options", [("dpmsolver++", {"order": 2}), ("sde-dpmsolver++", {})])
def test_gradient_for_conditioning_and_parameters(name, options, checkpoint):
    torch.manual_seed(0)
    net = CondNet()
    den = dp.wrap_model(net, SCHEDULE)
    x, c = torch.randn(4, 3), torch.randn(4, 2)
    params = list(net.parameters())

    def grads(run):
        xs, cs = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        out = run(xs, cs)
        return torch.autograd.grad(out.square().sum(), [xs, cs] + params)

    ref = grads(lambda xs, cs: unrolled(den, xs, name, 8, {"c": cs}, **options))
    got = grads(lambda xs, cs: dp.sample(den, xs, name, steps=8, seed=0, model_kwargs={"c": cs}, grad=True,
                                         checkpoint=checkpoint, progress=False, **options).x)
    assert len(got) == 2 + len(params)
    for g, r in zip(got, ref):
        assert g.abs().max() > 0 and rel(g, r) < 1e-6


def test_gradient_reaches_guidance_conditioning_once():
    """Classifier-free guidance concatenates cond and uncond at construction; the gradient must flow to the leaf
    once (not once through the concatenation and once directly)."""
    torch.manual_seed(1)
    net = CondNet()
    cond = torch.randn(4, 2, requires_grad=True)
    den = dp.ClassifierFreeGuidance(dp.wrap_model(net, SCHEDULE), 2.5, cond={"c": cond}, uncond={"c": torch.zeros(4, 2)})
    x = torch.randn(4, 3)
    xs = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(unrolled(den, xs, "dpmsolver++", 6).square().sum(), [xs, cond] + list(net.parameters()))
    xs = x.clone().requires_grad_(True)
    sol = dp.sample(den, xs, "dpmsolver++", steps=6, grad=True, progress=False)
    got = torch.autograd.grad(sol.x.square().sum(), [xs, cond] + list(net.parameters()))
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-6


def test_gradient_equals_unrolled_autograd_on_the_digits_network():
    from dpmsolve import zoo

    model = zoo.load("digits")
    net = model.net.double().requires_grad_(True)
    den = zoo.guided(model, torch.tensor([3, 8]), 3.0)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = list(net.parameters())
    xs = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(unrolled(den, xs, "dpmsolver++", 8).square().sum(), [xs] + params)
    for checkpoint in (False, True):
        xs = x.clone().requires_grad_(True)
        sol = dp.sample(den, xs, "dpmsolver++", steps=8, grad=True, checkpoint=checkpoint, progress=False)
        got = torch.autograd.grad(sol.x.square().sum(), [xs] + params)
        worst = max(rel(g, r) for g, r in zip(got, ref) if r.norm() > 0)
        assert worst < 1e-6, (checkpoint, worst)
        assert got[0].abs().max() > 0


def _peak_bytes(fn) -> int:
    """Peak CPU memory allocated by torch while ``fn`` runs (the profiler's allocation / free events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def test_memory_of_50_steps_is_within_1_5x_of_5_steps():
    from dpmsolve import zoo

    model = zoo.load("digits")
    model.net.float().requires_grad_(True)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    kwargs = {"y": torch.tensor([3])}

    def run(steps):
        def fn():
            xs = x.clone().requires_grad_(True)
            sol = dp.sample(model.denoiser, xs, "dpmsolver++", steps=steps, grad=True, model_kwargs=kwargs,
                            progress=False)
            sol.x.square().sum().backward()
        return fn

    try:
        p5, p50 = _peak_bytes(run(5)), _peak_bytes(run(50))
    finally:
        model.net.requires_grad_(False)
    assert p5 > 1e6                                  # the measure sees the network's activations
    assert p50 < 1.5 * p5, (p5, p50)




@pytest.mark.parametrize("checkpoint", [False, True], ids=["adjoint", "checkpoint"])
@pytest.mark.parametrize("name,options,extra", [("dpmsolver++", {"order": 2}, {}), ("heun", {}, {}),
                                                ("dpmsolver++", {}, {"denoise_to_zero": True})])
def test_backward_nfe_is_exact(mixture, name, options, extra, checkpoint):
    den = Counting(mixture)
    x = torch.randn(3, 3, requires_grad=True)
    sol = dp.sample(den, x, name, steps=6, grad=True, checkpoint=checkpoint, progress=False, **options, **extra)
    assert den.calls == sol.nfe
    sol.x.sum().backward()
    assert den.calls - sol.nfe == sol.stats["backward_nfe"] == sol.nfe


def test_loss_independent_of_the_sample_gives_zero_gradient(mixture):
    torch.manual_seed(0)
    net = CondNet()
    den = dp.wrap_model(net, SCHEDULE)
    x = torch.randn(2, 3, requires_grad=True)
    sol = dp.sample(den, x, "dpmsolver++", steps=4, grad=True, model_kwargs={"c": torch.zeros(2, 2)}, progress=False)
    (0.0 * sol.x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    # a loss that does not touch the sample at all: the sampler's backward never runs, nothing breaks
    y = torch.randn(2, 3, requires_grad=True)
    sol = dp.sample(mixture, y, "ddim", steps=3, grad=True, progress=False)
    (sol.x.detach().sum() + 0.0 * y.sum()).backward()
    assert torch.equal(y.grad, torch.zeros_like(y))


def test_exact_samplers_are_differentiable(mixture):
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    for method in (BDIA(), BDIA(0.5), EDICT()):
        xs = x.clone().requires_grad_(True)
        ref = torch.autograd.grad(unrolled(mixture, xs, method, 6).sum(), xs)[0]
        xs = x.clone().requires_grad_(True)
        sol = dp.sample(mixture, xs, "ddim", steps=6, exact=method, grad=True, progress=False)
        assert rel(torch.autograd.grad(sol.x.sum(), xs)[0], ref) < 1e-6


def test_float32_input_keeps_dtype_and_gradients_flow(mixture):
    x = torch.randn(3, 3, dtype=torch.float32, requires_grad=True)
    sol = dp.sample(mixture, x, "dpmsolver++", steps=4, grad=True, progress=False)
    assert sol.x.dtype == torch.float32
    sol.x.sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().max() > 0


def test_adaptive_solver_with_grad_is_refused_naming_what_works(mixture):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"grad=True needs a fixed-grid solver.*adaptive.*'dpmsolver\+\+'.*'ddim'"):
        dp.sample(mixture, x, "dpmsolver++", method="adaptive", grad=True, progress=False)


def test_grad_arguments_are_checked(mixture):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="checkpoint=True .* pass grad=True"):
        dp.sample(mixture, x, "ddim", steps=2, checkpoint=True, progress=False)
    with pytest.raises(TypeError, match="grad must be True or False"):
        dp.sample(mixture, x, "ddim", steps=2, grad="yes", progress=False)


def test_intermediates_and_callbacks_carry_no_graph(mixture):
    x = torch.randn(2, 3, requires_grad=True)
    seen = []
    sol = dp.sample(mixture, x, "dpmsolver++", steps=3, grad=True, checkpoint=True, return_intermediates=True,
                    callback=lambda info: seen.append(info.x), progress=False)
    assert all(not t.requires_grad for t in sol.trajectory + sol.x0_previews + seen)
    assert sol.x.requires_grad
