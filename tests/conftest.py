"""Shared fixtures: float64 by default, seeded generators, the analytic problems."""

import socket

import pytest
import torch

import dpmsolve as dp
from dpmsolve.lab import GaussianData, GaussianMixture

SCHEDULES = {
    "discrete": lambda: dp.DiscreteVP.linear(),
    "linear": lambda: dp.LinearVP(),
    "cosine": lambda: dp.CosineVP(),
    "edm": lambda: dp.EDM(),
    "flow": lambda: dp.RectifiedFlow(),
}




def deterministic_configs():
    """(id, registry name, options) for every deterministic fixed-grid DPM-Solver configuration (and DDIM)."""
    out = [("ddim", "ddim", {})]
    for name in ("dpmsolver", "dpmsolver++"):
        for st in ("dpmsolver", "taylor"):
            for order in (1, 2, 3):
                out.append((f"{name}-ms{order}-{st}", name, dict(order=order, solver_type=st)))
            out.append((f"{name}-ms3-{st}-warmup_lower", name, dict(order=3, solver_type=st, warmup="lower_order")))
            out.append((f"{name}-ms3-{st}-lof", name, dict(order=3, solver_type=st, lower_order_final=True)))
            for order in (1, 2, 3):
                out.append((f"{name}-ss{order}-{st}-fixed", name,
                            dict(method="singlestep", order=order, solver_type=st, split="fixed")))
            out.append((f"{name}-ss3-{st}-fast", name, dict(method="singlestep", order=3, solver_type=st, split="fast")))
    return out


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


@pytest.fixture
def gaussian():
    """Gaussian data with mean != 0 and unequal variances != 1, so no solver is accidentally exact."""
    return GaussianData([0.5, -0.3, 0.1, 0.8], [0.09, 0.5, 1.3, 0.02])


@pytest.fixture
def mixture():
    return GaussianMixture.random(k=3, dim=2, seed=0)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (models and data must load offline)."""
    def refuse(*args, **kwargs):
        raise AssertionError("zoo.load must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
