r"""Drop-in ``torch.optim`` optimizers that adapt their learning rate online: SGDHD, AdamHD, MARTHE.

They run the recursion of :mod:`hgtoolkit.online` (HD, RTHO, MARTHE) inside an ordinary
PyTorch training loop over an ``nn.Module``, with the optimizer update itself taken from
:mod:`hgtoolkit.dynamics` and the LR update from :func:`hgtoolkit.online.hyper_update` — the
same functions as the functional engine, so on the same problem and minibatches the
trajectories are the same (tested). At step t, for every param group k (η_k is its LR):

    h_t = v_t · z_t^{(k)},  η_t = max(η_{t−1} − β h_t, floor)      (t ≥ 1; μ, β rules as in MARTHE)
    s_{t+1} = Φ_t(s_t, η_t),  z_{t+1}^{(k)} = μ_k A_t z_t^{(k)} + B_t^{(k)}

with v_t = ∇L_t(w_t) (the gradient this step uses: ``objective="train"``, HD) or ∇E(w_t)
(``objective="val"``). After step t, ``param_groups[k]`` holds ``"lr"`` = η_t (the LR that
step used; ``online.run(...).lrs[t]``), ``"hypergrad"`` = h_t (the estimate that set it;
``.hypergrads[t−1]``), ``"beta_t"``, ``"mu_t"`` (β and μ for the next update) and ``"t"``.

HD in a plain loop (Baydin et al.; needs nothing but the gradient)::

    opt = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)   # or AdamHD(..., hypergrad_lr=1e-8)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

MARTHE / RTHO (μ ≠ 0) also need the Hessian-vector product H_t z. Pass a ``closure`` that
re-evaluates the training loss on the current minibatch and returns it **without calling
backward()**: the optimizer differentiates it itself with ``torch.autograd.grad`` (g_t, and
H_t z by a second backward through the gradient; no ``create_graph`` reference cycle on
``.grad``), and writes g_t into ``p.grad``. With ``objective="val"`` pass ``val_closure``
returning the validation loss E at the current parameters::

    opt = MARTHE(model.parameters(), lr=1e-3, beta="auto", mu="auto", kappa=1e-6)
    for x, y in loader:
        opt.step(lambda: F.cross_entropy(model(x), y),
                 val_closure=lambda: F.cross_entropy(model(x_val), y_val))

Per-step cost: one gradient (HD); one gradient + one HVP per param group with μ ≠ 0 (RTHO,
MARTHE); + one validation gradient for ``objective="val"``. Every param group has its own LR
η_k and its own tangent z^{(k)} = ∂s/∂η_k over *all* parameters (exact, since A_t couples the
groups); the state holds one tangent per group for each parameter and moment.

Divergence (non-finite loss, h or parameters, or |η| > ``lr_max``) raises
:class:`hgtoolkit.errors.DivergenceError` before any state is changed. ``state_dict()`` /
``load_state_dict()`` round-trip everything except a custom ``mu_rule`` (pass it again).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from . import dynamics as _dynamics
from . import online
from .errors import DivergenceError

__all__ = ["SGDHD", "AdamHD", "MARTHE"]

_HYPER_STATE = ("beta_t", "mu_t", "mu_memory", "hypergrad", "t")


def _nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


class _OnlineOptimizer(torch.optim.Optimizer):
    """Shared machinery; subclasses say which dynamics and hyper-settings a group has."""

    def __init__(self, params: Iterable, defaults: dict, *, objective: str = "train",
                 mu_rule: Callable | None = None):
        if not isinstance(objective, str) or objective not in online.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {online.OBJECTIVES}")
        self.objective = objective
        self.mu_rule = mu_rule
        super().__init__(params, defaults)

    # -- subclass hooks -------------------------------------------------------------------
    def _dynamics(self, group: dict) -> _dynamics.Dynamics:
        raise NotImplementedError

    def _hyper_kwargs(self, group: dict) -> dict:
        """Keyword arguments of :func:`online.hyper_config` for this group (besides lr0…)."""
        raise NotImplementedError

    # -- groups ---------------------------------------------------------------------------
    def _config(self, group: dict) -> online.HyperConfig:
        cfg, _ = online.hyper_config(lr0=group["lr0"], objective=self.objective,
                                     lr_floor=group["lr_floor"], lr_max=group["lr_max"],
                                     mu_rule=self.mu_rule, **self._hyper_kwargs(group))
        return cfg

    def add_param_group(self, param_group: dict) -> None:
        if any(self.state.values()):
            raise ValueError("add_param_group after the first step is not supported: every "
                             "group's tangent spans all parameters; build a new optimizer")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = _nonneg(group["lr"], "lr")
        self._dynamics(group)  # validates the dynamics' hyperparameters
        group.setdefault("lr0", group["lr"])
        cfg, hs = online.hyper_config(lr0=group["lr0"], objective=self.objective,
                                      lr_floor=group["lr_floor"], lr_max=group.get("lr_max"),
                                      mu_rule=self.mu_rule, **self._hyper_kwargs(group))
        group["lr_max"] = cfg.lr_max
        for key, value in (("beta_t", hs.beta), ("mu_t", hs.mu), ("mu_memory", hs.memory),
                           ("hypergrad", hs.hypergrad), ("t", 0)):
            group.setdefault(key, value)

    @property
    def needs_closure(self) -> bool:
        """True when a training-loss closure is required (some group has μ ≠ 0: H_t z)."""
        return any(self._config(g).needs_hvp for g in self.param_groups)

    # -- the step -------------------------------------------------------------------------
    @staticmethod
    def _grads(loss: torch.Tensor, params: list, create_graph: bool, what: str) -> list:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{what} must return the loss as a one-element tensor, got {type(loss).__name__}")
        try:
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        except RuntimeError as exc:
            raise RuntimeError(f"could not differentiate the loss returned by {what}: it must be "
                               f"computed from the current parameters with autograd enabled and "
                               f"must NOT call backward() itself ({exc})") from exc
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    @staticmethod
    def _hvp(grads: list, params: list, vectors: list, retain: bool) -> list:
        """H v = ∇(g·v) by a second backward through the gradient's graph."""
        pairs = [(g, v) for g, v in zip(grads, vectors) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        out = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                                  retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out)]

    def _init_state(self, dyns: list, plist: list, K: int) -> None:
        for dyn, ps in zip(dyns, plist):
            s0 = dyn.init([p.detach() for p in ps])
            for i, p in enumerate(ps):
                st = self.state[p]
                if "tangent_w" in st:
                    continue
                for key in s0:
                    if key != "w":
                        st[key] = s0[key][i].clone()
                    st["tangent_" + key] = torch.zeros((K, *p.shape), dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def _online_step(self, closure: Callable | None, val_closure: Callable | None):
        groups, K = self.param_groups, len(self.param_groups)
        t = groups[0]["t"]
        cfgs = [self._config(g) for g in groups]
        dyns = [self._dynamics(g) for g in groups]
        plist = [list(g["params"]) for g in groups]
        flat = [p for ps in plist for p in ps]
        self._init_state(dyns, plist, K)
        state = self.state
        hvp_groups = [k for k in range(K) if t > 0 and cfgs[k].needs_hvp]

        # 1. g_t (and H_t z_t^{(k)} for the groups with μ ≠ 0)
        loss, hz = None, {}
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
                grads = self._grads(loss, flat, bool(hvp_groups), "closure")
                for i, k in enumerate(hvp_groups):
                    hz[k] = self._hvp(grads, flat, [state[p]["tangent_w"][k] for p in flat],
                                      retain=i < len(hvp_groups) - 1)
            grads = [g.detach() for g in grads]
            for p, g in zip(flat, grads):
                p.grad = g.clone()
            loss = loss.detach()
            if not bool(torch.isfinite(loss)):
                raise DivergenceError(t, "training loss", float(loss))
        else:
            if hvp_groups:
                raise ValueError("closure is required: with μ ≠ 0 (RTHO/MARTHE) the optimizer needs "
                                 "H_t z from a closure returning the training loss (without backward())")
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in flat]

        # 2. hyper-update of iteration t−1: h_t, η_t, β_t, μ_t (nothing is changed on failure)
        hstates = [online.HyperState(lr=g["lr"], beta=g["beta_t"], mu=g["mu_t"],
                                     memory=g["mu_memory"], hypergrad=g["hypergrad"]) for g in groups]
        if t > 0:
            if self.objective == "val":
                if val_closure is None:
                    raise ValueError("val_closure is required with objective='val': it must return "
                                     "the validation loss at the current parameters")
                with torch.enable_grad():
                    v = [g.detach() for g in self._grads(val_closure(), flat, False, "val_closure")]
            else:
                v = grads
            offsets = [0]
            for ps in plist:
                offsets.append(offsets[-1] + len(ps))
            for k in range(K):
                h = float(sum((vi * state[p]["tangent_w"][k]).sum() for vi, p in zip(v, flat)))
                grad_dot = math.nan
                if cfgs[k].mu_rule is not None:
                    a, b = offsets[k], offsets[k + 1]
                    grad_dot = float(sum((vi * state[p]["prev_grad"]).sum()
                                         for vi, p in zip(v[a:b], flat[a:b])))
                hstates[k] = online.hyper_update(hstates[k], cfgs[k], h, grad_dot, t - 1)

        # 3. s_{t+1} = Φ_t(s_t, η_t) and z_{t+1}^{(k)} = μ_k A_t z_t^{(k)} + B_t^{(k)}, per group j
        updates, start = [], 0
        for j, (dyn, ps) in enumerate(zip(dyns, plist)):
            gj = grads[start:start + len(ps)]
            keys = ["w"] + [k for k in dyn.init([ps[0].detach()]) if k != "w"]
            s_j = {key: [p.detach() if key == "w" else state[p][key] for p in ps] for key in keys}
            scalar = lambda x: torch.tensor(x, dtype=ps[0].dtype, device=ps[0].device)
            lr = scalar(hstates[j].lr)
            new_s, b_t = online.dynamics_tangent(dyn, s_j, gj, lr, t)
            tangents = []
            for k in range(K):
                mu_k = hstates[k].mu
                if k in hz and mu_k != 0.0:
                    z_k = {key: [state[p]["tangent_" + key][k] for p in ps] for key in keys}
                    _, z_new = online.dynamics_tangent(dyn, s_j, gj, lr, t, scalar(mu_k), z_k,
                                                       hz[k][start:start + len(ps)],
                                                       dlr=1.0 if j == k else 0.0)
                elif j == k:
                    z_new = b_t
                else:
                    z_new = {key: [torch.zeros_like(x) for x in new_s[key]] for key in keys}
                tangents.append(z_new)
            if not all(bool(torch.isfinite(w).all()) for w in new_s["w"]):
                raise DivergenceError(t, "parameters after the step")
            updates.append((ps, keys, new_s, tangents, gj))
            start += len(ps)

        # 4. commit
        for (ps, keys, new_s, tangents, gj), group, hs, cfg in zip(updates, groups, hstates, cfgs):
            for i, p in enumerate(ps):
                st = state[p]
                p.copy_(new_s["w"][i])
                for key in keys:
                    if key != "w":
                        st[key] = new_s[key][i]
                    st["tangent_" + key] = torch.stack([tangents[k][key][i] for k in range(K)])
                if any(c.mu_rule is not None for c in cfgs):
                    st["prev_grad"] = gj[i].clone()
            group.update(lr=hs.lr, beta_t=hs.beta, mu_t=hs.mu, mu_memory=hs.memory,
                         hypergrad=hs.hypergrad, t=t + 1)
        return loss


class SGDHD(_OnlineOptimizer):
    r"""SGD-HD and SGDN-HD (Baydin et al. 2018): SGD (optionally Nesterov/heavy-ball momentum,
    as ``torch.optim.SGD`` with dampening 0) whose LR follows

        η_t = η_{t−1} − β h_t,   h_t = ∇L_t(w_t)·z_t,   z_t = B_{t−1} = −d_{t−1}

    (d the update direction; SGD: η_t = η_{t−1} + β g_t·g_{t−1}), computed before step t from
    the gradient step t uses — no extra evaluation. ``hypergrad_lr`` is β; ``lr_floor=None``
    (Baydin's choice) lets η go negative, ``lr_floor=0.0`` clips it.
    ``step(closure=None)``: the closure, if given, returns the loss without calling backward().
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, hypergrad_lr: float = 1e-3,
                 lr_floor: float | None = None, lr_max: float | None = None):
        _nonneg(hypergrad_lr, "hypergrad_lr")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        hypergrad_lr=hypergrad_lr, lr_floor=lr_floor, lr_max=lr_max)
        super().__init__(params, defaults, objective="train")

    def _dynamics(self, group):
        return _dynamics.SGD(momentum=group["momentum"], nesterov=group["nesterov"],
                             weight_decay=group["weight_decay"])

    def _hyper_kwargs(self, group):
        return {"method": "hd", "beta": _nonneg(group["hypergrad_lr"], "hypergrad_lr")}

    def step(self, closure: Callable | None = None):
        return self._online_step(closure, None)


class AdamHD(_OnlineOptimizer):
    r"""Adam-HD (Baydin et al. 2018): Adam (as ``torch.optim.Adam``) whose LR follows
    η_t = η_{t−1} − β ∇L_t(w_t)·z_t with z_t = B_{t−1} = −m̂_{t−1}/(√v̂_{t−1} + ε).
    ``hypergrad_lr`` is β (the paper uses 1e-8); see :class:`SGDHD` for the rest."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, hypergrad_lr: float = 1e-8,
                 lr_floor: float | None = None, lr_max: float | None = None):
        _nonneg(hypergrad_lr, "hypergrad_lr")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hypergrad_lr=hypergrad_lr, lr_floor=lr_floor, lr_max=lr_max)
        super().__init__(params, defaults, objective="train")

    def _dynamics(self, group):
        b1, b2 = group["betas"]
        return _dynamics.Adam(beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _hyper_kwargs(self, group):
        return {"method": "hd", "beta": _nonneg(group["hypergrad_lr"], "hypergrad_lr")}

    def step(self, closure: Callable | None = None):
        return self._online_step(closure, None)


class MARTHE(_OnlineOptimizer):
    r"""MARTHE (Donini et al. 2020) — and, with ``method="rtho"``/``"hd"``, RTHO and HD — as a
    ``torch.optim`` optimizer over any :mod:`hgtoolkit.dynamics` (``optimizer="sgd"``,
    ``"nesterov"``, ``"adam"``, or a Dynamics object).

    Arguments mirror :func:`hgtoolkit.online.run`: ``beta`` (number or ``"auto"``), ``mu``
    (number in [0, 1] or ``"auto"``), ``kappa``, ``beta0``, ``beta_rule``, ``mu_rule``,
    ``objective`` (``"val"`` needs ``val_closure``), ``lr_floor`` (default 0), ``lr_max``.
    ``step(closure, val_closure=None)``: ``closure`` returns the training loss on the current
    minibatch without calling backward() (required whenever μ ≠ 0); ``val_closure`` the
    validation loss (required for ``objective="val"``). Returns the training loss (detached).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, *, method: str = "marthe",
                 beta: Any = None, mu: Any = None, kappa: float = 1e-6, beta0: float = 0.0,
                 beta_rule: str = "hh", mu_rule: Callable | None = None, objective: str = "val",
                 optimizer: "str | _dynamics.Dynamics" = "sgd", lr_floor: float | None = 0.0,
                 lr_max: float | None = None):
        dyn = _dynamics.get(optimizer)
        defaults = dict(lr=lr, method=method, beta=beta, mu=mu, kappa=kappa, beta0=beta0,
                        beta_rule=beta_rule, optimizer=dyn.config(), lr_floor=lr_floor, lr_max=lr_max)
        super().__init__(params, defaults, objective=objective, mu_rule=mu_rule)

    def _dynamics(self, group):
        cfg = group["optimizer"]
        return cfg if isinstance(cfg, _dynamics.Dynamics) else _dynamics.from_config(cfg)

    def _hyper_kwargs(self, group):
        return {k: group[k] for k in ("method", "beta", "mu", "kappa", "beta0", "beta_rule")}

    def step(self, closure: Callable | None = None, val_closure: Callable | None = None):
        return self._online_step(closure, val_closure)
