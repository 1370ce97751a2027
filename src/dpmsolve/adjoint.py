"""Gradients through the sampler: the discrete adjoint (``sample(..., grad=True)``) and per-step checkpointing
(``sample(..., grad=True, checkpoint=True)``).

Why the discrete adjoint. AdjointDPM (Pan et al. 2023) solves the continuous adjoint ODE backwards with an
exponential integrator, recovering x_t by solving the probability-flow ODE backwards alongside. Its gradient is
that of the *exact* flow, so it differs from the gradient of the sample the solver actually returned by the
solver's discretisation error (of the same order as the sample's own error: 1e-2 relative at 10-20 steps on the
digits model), and the backward reconstruction of x_t adds an inversion error on top. A gradient that has to
agree with autograd through the unrolled sampler to 1e-6 (and that is the derivative of the sample one got) is
the adjoint of the *discrete* scheme: the reverse pass over the same stages. Each backward step re-evaluates the
model at the stored input of that step and applies its vector-Jacobian product; the linear update of the step
(host float64 coefficients) is differentiated by autograd on the step's few tensors. So the network's
activations are held for one step at a time, and what is stored per step is only the solver state (the sample
and the predictions a multistep update reads: two or three tensors of the sample's size per step, against
tens of activation tensors of the network per evaluation).

NFE of the backward pass: exactly one re-evaluation of the model per forward evaluation (each followed by one
vector-Jacobian product through the network), so forward + backward = 2 NFE forward passes + NFE VJPs (unrolled
autograd: NFE forward passes + NFE VJPs, with every step's activations held). ``Solution.stats['backward_nfe']``
says it. The same holds for ``checkpoint=True`` (``torch.utils.checkpoint`` around each step).

What gets gradients: the start noise, tensors in ``model_kwargs``, and the tensors the denoiser holds: the
parameters of the networks it wraps (``wrap_model``'s net, also inside guidance wrappers and closures) and the
guidance wrappers' ``cond`` / ``uncond`` tensors. ``checkpoint=True`` covers anything autograd can see.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import torch

from .inversion import NoiseDriver, StepDriver
from .model import Denoiser, Prediction

_SKIP_FIELDS = frozenset({"nodes", "stages", "generator", "coeffs", "schedule"})


# ------------------------------------------------------------------------------------- state tensors (by position)
def _is_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)


def _roles(state, prefix: tuple = ()) -> list[tuple[tuple, torch.Tensor]]:
    """(role, tensor) of every tensor a solver state holds: fields, tuple items, (index, tensor) pairs, and the
    same inside nested state dataclasses (a wrapper solver's ``base`` state)."""
    out = []
    for f in dataclasses.fields(state):
        if f.name in _SKIP_FIELDS:
            continue
        value = getattr(state, f.name)
        role = prefix + (f.name,)
        if isinstance(value, torch.Tensor):
            out.append((role, value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(_roles(value, role))
        elif isinstance(value, tuple):
            for k, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    out.append((role + (k,), item))
                elif _is_pair(item):
                    out.append((role + (k, 1), item[1]))
        elif isinstance(value, (list, dict)) and any(isinstance(v, torch.Tensor) for v in
                                                     (value.values() if isinstance(value, dict) else value)):
            raise ValueError(f"grad=True: the discrete adjoint cannot follow the tensors in the {type(state).__name__} "
                             f"field {'.'.join(role)!r} (a {type(value).__name__}; solver states keep tensors in fields "
                             "and tuples). Pass checkpoint=True as well, which differentiates any solver autograd can.")
    return out


def _rebuild(state, swap: dict[int, torch.Tensor]):
    """``state`` with every tensor ``T`` (as ``_roles`` finds them) replaced by ``swap[id(T)]``."""
    changes = {}
    for f in dataclasses.fields(state):
        if f.name in _SKIP_FIELDS:
            continue
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = swap[id(value)]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _rebuild(value, swap)
        elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) or _is_pair(v) for v in value):
            changes[f.name] = tuple(swap[id(v)] if isinstance(v, torch.Tensor) else
                                    (v[0], swap[id(v[1])]) if _is_pair(v) else v for v in value)
    return dataclasses.replace(state, **changes)


# ------------------------------------------------------------------------------ the tensors that get gradients
def grad_inputs(denoiser: Denoiser, model_kwargs: dict[str, Any], limit: int = 20000) -> list[torch.Tensor]:
    """Tensors requiring grad that the model calls read: model_kwargs' tensors, the parameters of the networks
    the denoiser holds (through wrappers, bound methods, partials and closures), and tensors it holds.

    A tensor computed from another one in the list (classifier-free guidance concatenates ``cond`` and ``uncond``
    once) is replaced by the leaves it is computed from, so that no path is counted twice."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj, depth: int) -> None:
        if depth > 12 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad:
                found.setdefault(id(obj), obj)
        elif isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                if p.requires_grad:
                    found.setdefault(id(p), p)
            for value in vars(obj).values():      # tensors held as plain attributes
                if isinstance(value, torch.Tensor):
                    walk(value, depth + 1)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for value in obj:
                walk(value, depth + 1)
        elif isinstance(obj, functools.partial):
            walk(obj.func, depth + 1)
            walk(obj.args, depth + 1)
            walk(obj.keywords, depth + 1)
        elif isinstance(obj, types.MethodType):
            walk(obj.__self__, depth + 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    walk(cell.cell_contents, depth + 1)
                except ValueError:               # an empty cell
                    pass
        elif isinstance(obj, Denoiser) or (hasattr(obj, "__dict__") and not isinstance(obj, type)
                                           and type(obj).__module__.split(".")[0] not in ("torch", "numpy")):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(model_kwargs, 0)
    walk(denoiser, 0)
    tensors = list(found.values())
    members = {id(t) for t in tensors}
    leaves_of = {}
    for t in tensors:
        if t.grad_fn is not None:
            reached, leaves = _reach(t.grad_fn, members, limit)
            if reached:
                leaves_of[id(t)] = leaves
    out = [t for t in tensors if id(t) not in leaves_of]
    ids = {id(t) for t in out}
    for leaves in leaves_of.values():
        for leaf in leaves:
            if id(leaf) not in ids:
                ids.add(id(leaf))
                out.append(leaf)
    return out


def _reach(fn, members: set[int], limit: int) -> tuple[bool, list[torch.Tensor]]:
    """Whether the graph below ``fn`` reaches a tensor in ``members``, and the leaves requiring grad it reaches."""
    stack, visited, leaves, reached = [fn], set(), [], False
    while stack and len(visited) < limit:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            leaves.append(variable)
            reached |= id(variable) in members
        for next_fn, _ in getattr(node, "next_functions", ()):
            stack.append(next_fn)
    return reached, leaves


# ------------------------------------------------------------------------------------------ the discrete adjoint
class Recorder(StepDriver):
    """Records the state before every step (and the noise of stochastic steps) during a no-grad forward pass."""

    def __init__(self, inner: StepDriver):
        self.inner = inner
        self.states: list = []
        self.last = None
        self.final_input: tuple[torch.Tensor, float] | None = None
        self.final_output: torch.Tensor | None = None

    def start(self, solver, state):
        state = self.inner.start(solver, state)
        self.last = state
        return state

    def advance(self, solver, state, evaluate):
        self.states.append(state)
        new, pred = self.inner.advance(solver, state, evaluate)
        self.last = new
        return new, pred

    def final(self, x, t, evaluate):
        out = self.inner.final(x, t, evaluate)
        self.final_input, self.final_output = (x, t), out
        return out


class AdjointRun:
    """One ``sample(..., grad=True)`` run: its forward (a recorded no-grad solve) and its reverse pass."""

    def __init__(self, solve: Callable[[torch.Tensor, StepDriver], Any], denoiser: Denoiser, solver,
                 model_kwargs: dict, work: torch.dtype, inner: StepDriver):
        self.solve, self.denoiser, self.solver = solve, denoiser, solver
        self.model_kwargs, self.work = model_kwargs, work
        self.recorder = Recorder(inner)
        self.solution = None
        self.x_in: torch.Tensor | None = None
        self.backward_nfe = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x_in = x
        self.solution = self.solve(x, self.recorder)
        rec = self.recorder
        return rec.final_output if rec.final_output is not None else self.solver.current(rec.last)[0]

    def _evaluate(self, x: torch.Tensor, t: float) -> Prediction:
        self.backward_nfe += 1
        pred = self.denoiser(x, t, **self.model_kwargs)
        return Prediction(pred.x0.to(self.work), pred.eps.to(self.work))

    def backward(self, grad: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list]:
        rec, solver = self.recorder, self.solver
        replay = rec.inner
        if isinstance(replay, NoiseDriver):
            replay = NoiseDriver("replay", noises=[replay.noises.get(k) for k in range(len(replay.stds))])
            replay.stds = rec.inner.stds
        acc: list[torch.Tensor | None] = [None] * len(inputs)
        adj: dict[int, torch.Tensor] = {}
        grad = grad.to(self.work)

        def collect(outs, gouts, leaves):
            if not outs:
                return [None] * len(leaves)
            got = torch.autograd.grad(outs, list(leaves) + inputs, gouts, allow_unused=True, retain_graph=True)
            for j, g in enumerate(got[len(leaves):]):
                if g is not None:                    # the first gradient is a fresh tensor: add in place
                    acc[j] = g if acc[j] is None else acc[j].add_(g)
            return got[:len(leaves)]

        last_x = solver.current(rec.last)[0]
        if rec.final_input is not None:            # the final jump to the x0 prediction
            x_in, t = rec.final_input
            leaf = x_in.detach().requires_grad_(True)
            with torch.enable_grad():
                out = self._evaluate(leaf, t).x0
            (g,) = collect([out], [grad], [leaf])
            if g is not None:
                adj[id(x_in)] = g
        else:
            adj[id(last_x)] = grad

        after = rec.last
        for before in reversed(rec.states):
            leaves = {}
            for _, tensor in _roles(before):
                if id(tensor) not in leaves:
                    leaves[id(tensor)] = tensor.detach().requires_grad_(True)
            leaf_ids = {id(v) for v in leaves.values()}
            with torch.enable_grad():
                new, _ = replay.advance(solver, _rebuild(before, leaves), self._evaluate)
            outs, gouts, done = [], [], set()
            stored_roles, fresh_roles = _roles(after), _roles(new)
            if [r for r, _ in stored_roles] != [r for r, _ in fresh_roles]:
                raise RuntimeError(f"grad=True: re-running a step of {solver!r} gave a state of another layout than "
                                   "the forward pass; the solver's steps must be deterministic functions of the state. "
                                   "Pass checkpoint=True instead.")
            for (role, stored), (_, fresh) in zip(stored_roles, fresh_roles):
                if id(stored) in done or id(stored) not in adj:
                    continue
                done.add(id(stored))
                if id(fresh) in leaf_ids:           # passed through unchanged: its adjoint carries over
                    continue
                outs.append(fresh)
                gouts.append(adj.pop(id(stored)))
            ids = list(leaves)
            for sid, g in zip(ids, collect(outs, gouts, [leaves[k] for k in ids])):
                if g is not None:
                    adj[sid] = g if sid not in adj else adj[sid] + g
            del new, outs, gouts, leaves              # free this step's graph before the next is built
            after = before
        return adj.get(id(self.x_in)), acc


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: AdjointRun, x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.inputs = run, inputs
        ctx.set_materialize_grads(False)
        return run.forward(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if grad is None:                              # the loss does not depend on the sample
            return (None, None) + (None,) * len(ctx.inputs)
        gx, grads = ctx.run.backward(grad, list(ctx.inputs))
        return (None, gx, *grads)


def adjoint_solve(run: AdjointRun, x: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The sample of ``run`` from ``x``, differentiable in ``x`` and ``inputs`` by the discrete adjoint."""
    return _Adjoint.apply(run, x, *inputs)


# ------------------------------------------------------------------------------------------------ checkpointing
class CheckpointDriver(StepDriver):
    """Runs each step (evaluation and update) under ``torch.utils.checkpoint``: its activations are dropped after
    the forward pass and recomputed, once, in the backward pass."""

    differentiable = True

    def __init__(self, inner: StepDriver, denoiser: Denoiser, model_kwargs: dict, work: torch.dtype):
        self.inner, self.denoiser, self.model_kwargs, self.work = inner, denoiser, model_kwargs, work
        self.backward_nfe = 0

    def start(self, solver, state):
        return self.inner.start(solver, state)

    def _recompute(self, x, t):
        self.backward_nfe += 1
        pred = self.denoiser(x, t, **self.model_kwargs)
        return Prediction(pred.x0.to(self.work), pred.eps.to(self.work))

    def _checkpointed(self, run, arg, evaluate):
        """``run(arg, evaluate)`` under torch.utils.checkpoint: the first (forward) call evaluates as given, the
        backward pass's recomputation through ``_recompute``."""
        from torch.utils.checkpoint import checkpoint

        calls = [0]

        def once(arg):
            calls[0] += 1
            return run(arg, evaluate if calls[0] == 1 else self._recompute)

        return checkpoint(once, arg, use_reentrant=False)

    def advance(self, solver, state, evaluate):
        return self._checkpointed(lambda s, ev: self.inner.advance(solver, s, ev), state, evaluate)

    def final(self, x, t, evaluate):
        return self._checkpointed(lambda y, ev: self.inner.final(y, t, ev), x, evaluate)
