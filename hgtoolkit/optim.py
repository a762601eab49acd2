r"""Drop-in ``torch.optim`` optimizers that adapt their learning rate online: SGDHD, AdamHD, MARTHE.

Each is a thin ``torch.optim.Optimizer`` around the pure online engine
(:class:`hgtoolkit.online.Engine`): every param group is one online run with its own LR, the
optimizer update and its tangent come from :mod:`hgtoolkit.dynamics`, the hyper-update from
``Engine.hyper_update`` — the same functions as :func:`hgtoolkit.online.run`, so on the same
problem and minibatches the trajectories are the same (tested). At step t, for a group:

    h_t = v_t · z_t,  η_t = max(η_{t−1} − β h_t, floor)      (t ≥ 1; μ, β rules as in MARTHE)
    s_{t+1} = Φ_t(s_t, η_t),  z_{t+1} = μ A_t z_t + B_t

with v_t = ∇L_t(w_t) + wd·w_t (the gradient this step uses: ``objective="train"``, HD) or
∇E(w_t) (``objective="val"``).

torch.optim semantics
---------------------
- Parameters whose ``.grad`` is None at a step (frozen ones, unused branches) are skipped:
  no weight decay, no momentum, no state change — as ``torch.optim.SGD``/``Adam``; Adam's bias
  correction counts each parameter's own updates (``state[p]["n_updates"]``), as torch.optim
  does. A skipped parameter keeps w, so its tangent decays, z ← μ_t z (0 for HD).
- Every group keeps its own options (``lr``, ``weight_decay``, ``momentum``, ``betas``,
  ``hypergrad_lr``, a constant ``mu``, …), read at every step; ``add_param_group`` adds a new
  online run.
- The gradient contract (docs/dropins.md): a step uses what you left in ``p.grad`` (clipped,
  hooked, unscaled); ``step(closure)`` after your ``backward()`` takes only the loss and H_t z
  from the closure (the Hessian of the closure's loss: a transformation of the gradient is not
  differentiated), and without a ``backward()`` of yours the closure's gradient, written into
  ``p.grad``. A gradient the optimizer wrote and that was changed in place since raises.
  ``module=model``: the closure's and ``val_closure``'s extra forward passes leave the model's
  buffers as they were and replay the RNG state of your forward (dropout masks).
- Your ``p.grad`` is yours: SGDHD (plain SGD) and the towers need last step's gradient again at
  the next step, and keep that tensor itself only where your loop gives ``p.grad`` as new memory
  at every step (``zero_grad()``, which sets it to None; seen at the second step), else a copy.
  A loop that later starts to zero or accumulate in place without this optimizer's
  ``zero_grad`` gets a RuntimeError at the next step instead of a hypergradient from a changed
  tensor (:meth:`DropIn._keep`).
- ``state_dict()``/``load_state_dict()`` hold tensors and plain numbers only
  (``torch.load(..., weights_only=True)`` reads them); a custom ``mu_rule`` is not saved.

The scheduler contract (the same for every drop-in)
---------------------------------------------------
``group["lr"]`` is the *base* LR: it belongs to you and to ``torch.optim.lr_scheduler``. The
hypergradient learns a multiplier m_t ≥ 0 (``group["lr_scale"]``, m_0 = 1) and the LR a step
uses is η_t = ``group["lr"]`` × m_t, reported as ``group["effective_lr"]``. The hyper-update
acts on η (η_t = η_{t−1} − β h_t, in units of the base LR step t−1 used), so a scheduler that
multiplies the base LR by r multiplies the learnt LR by r, and with a constant base the
optimizer is exactly the online method. ``group["hypergrad"]`` = h_t, ``"hypergrad_lr_t"``,
``"mu_t"`` (β, μ for the next update) and ``"t"`` are updated after each step.

Usage
-----
HD in a plain loop (Baydin et al.; needs nothing but the gradient)::

    opt = SGDHD(model.parameters(), lr=1e-2, hypergrad_lr=1e-3)   # or AdamHD(..., hypergrad_lr=1e-8)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

MARTHE / RTHO (μ ≠ 0) also need the Hessian-vector product H_t z. Pass a ``closure`` that
re-evaluates the training loss on the current minibatch and returns it **without calling
backward()**: the optimizer differentiates it itself (H_t z by a second backward through the
gradient; and g_t, written into ``p.grad``, unless ``p.grad`` already holds yours). With ``objective="val"`` pass
``val_closure`` returning the validation loss E at the current parameters::

    opt = MARTHE(model.parameters(), lr=1e-3, hypergrad_lr="auto", mu="auto", kappa=1e-6)
    for x, y in loader:
        opt.step(lambda: F.cross_entropy(model(x), y),
                 val_closure=lambda: F.cross_entropy(model(x_val), y_val))

Per-step cost: one gradient (HD); one gradient + one HVP per group with μ ≠ 0 (RTHO, MARTHE);
+ one validation gradient for ``objective="val"``. With several groups and μ ≠ 0, group k's
tangent is carried over its own parameters only (z^{(k)} = ∂w_k/∂η_k, H_kk z^{(k)}): the
cross-group curvature terms are dropped; with one group (``model.parameters()``) and for HD
it is exact.

The plumbing (``"lr"``, ``lr_scale``, ``effective_lr``, ``t``, ``diverged_at`` in every group,
the parameters taking part in a step, divergence reporting) is :class:`DropIn`, shared with
:class:`hgtoolkit.towers.TowerOptimizer`, which follows the same contract.

Divergence (the engine's criterion: non-finite loss, h, η or β, |η| > ``lr_max``,
the closure's loss above ``divergence_factor`` × its first value): the step is not applied,
a :class:`hgtoolkit.errors.DivergenceWarning` names the step and ``group["diverged_at"]`` records
it; later steps leave that group alone. ``raise_on_divergence=True`` raises
:class:`hgtoolkit.errors.DivergenceError` instead.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import torch

from . import _guards, fastpaths
from . import dynamics as _dynamics
from . import online
from . import divergence as _divergence
from . import errors as _errors
from . import settings as _settings

__all__ = ["SGDHD", "AdamHD", "MARTHE", "OnlineOptimizer", "DropIn"]

#: the param-group key listing the online settings the group was given (OnlineOptimizer.add_param_group)
_GIVEN = "given_settings"

# per-group online state kept in the param group (plain numbers: state_dict-safe)
_GROUP_STATE = {"hypergrad_lr_t": None, "mu_t": None, "mu_counter": 0.0, "hypergrad": 0.0,
                "ref_loss": math.nan, "hypergrad_lr_capped": 0, "prev_lr": None, "prev_base": None}


def _nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    return float(value)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b live in the same storage (one may be a view or ``.detach()`` of the other)."""
    pa = a.untyped_storage().data_ptr()
    return pa != 0 and pa == b.untyped_storage().data_ptr()


class DropIn(torch.optim.Optimizer):
    """The ``torch.optim`` plumbing every drop-in shares (:class:`OnlineOptimizer`,
    :class:`hgtoolkit.towers.TowerOptimizer`): ``"lr"`` (the base LR, validated) and the
    learnt-multiplier keys in every group (``lr_scale``, ``effective_lr``, ``t``,
    ``diverged_at``), the parameters that take part in a step (``.grad`` not None), and
    divergence reporting (a :class:`DivergenceWarning` naming the step, or
    :class:`DivergenceError` with ``raise_on_divergence=True``)."""

    def __init__(self, params: Iterable, defaults: dict, *, raise_on_divergence: bool = False):
        self.raise_on_divergence = bool(raise_on_divergence)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"params must be floating-point tensors, got {p.dtype}")
        group["lr"] = _nonneg(group["lr"], "lr")
        for key, value in (("lr_scale", 1.0), ("t", 0), ("diverged_at", None)):
            group.setdefault(key, value)
        group.setdefault("effective_lr", group["lr"] * group["lr_scale"])

    @staticmethod
    def _active(group: dict) -> list:
        """The group's parameters that take part in this step: those whose ``.grad`` is not None
        (torch.optim skips the others: no weight decay, no momentum, no state change)."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise TypeError("sparse gradients are not supported")
        return params

    # -- gradients kept until the next step ----------------------------------------------------
    # HD needs g_t again at step t+1 (SGD: h_{t+1} = −v·g_t), a tower its G¹ input. A copy costs
    # a memory pass per step; keeping p.grad itself is safe as long as nothing writes into that
    # tensor before the next step. The usual loop never does: zero_grad() sets p.grad to None and
    # backward() makes a new tensor. zero_grad(set_to_none=False), or gradients accumulated into
    # p.grad across steps, would. So the first step copies and holds on to the tensors p.grad
    # held; from the second step on, if p.grad is new memory at every step (``_grad_mode``
    # "reference"), the gradients are kept by reference, else ("copy") copied. A kept tensor that
    # p.grad still holds and that was written to since is caught at the next step
    # (RuntimeError), and this optimizer's zero_grad(set_to_none=False) first turns kept
    # references into copies. Steps whose gradients a closure computed (``_closure_grads``) copy.
    _KEPT: tuple = ()  # the state keys that may hold a gradient kept by reference

    def _observe_grads(self, backward_driven: bool = True) -> None:
        """Called at the start of each step: learn (at the second step) whether p.grad is a new
        tensor at every step, and whether this step may keep gradients by reference."""
        mode = self.__dict__.get("_grad_mode")
        if backward_driven and mode == "probe":
            probe = self._grad_probe
            fresh = all(p.grad is None or not _same_memory(p.grad, g) for p, g in probe.items())
            mode = self._grad_mode = "reference" if fresh else "copy"
            self._grad_probe = {}
        elif backward_driven and mode is None:
            self._grad_probe = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}
            self._grad_mode = "probe"
        self._by_reference = backward_driven and mode == "reference"

    def _check_kept(self, params: list, kept_tensors: list) -> None:
        """Raise if a gradient kept by reference (``kept_tensors[i]`` for ``params[i]``) was
        written to since it was kept."""
        versions = self.__dict__.get("_kept_versions")
        if not versions:
            return
        for p, kept in zip(params, kept_tensors):
            version = versions.get(id(p))
            if version is not None and kept is not None and kept._version != version and _same_memory(kept, p.grad):
                raise RuntimeError(
                    f"{type(self).__name__}: p.grad was changed in place since the last step "
                    f"(zero_grad(set_to_none=False) or gradients accumulated into it), but that step "
                    f"kept it as g_(t-1) for the hypergradient, having seen a new p.grad tensor at "
                    f"every step before: zero the gradients the same way at every step (zero_grad() "
                    f"sets them to None; this optimizer's zero_grad(set_to_none=False) is fine too)")

    def _keep(self, params: list, kept: list, spares: list) -> list:
        """``kept[i]`` as kept until the next step: itself unless it is ``params[i].grad``'s memory
        and this step may not keep that by reference; then a copy, into ``spares[i]`` (a buffer of
        this optimizer that the step used up) when it fits."""
        out = list(kept)
        versions = self.__dict__.setdefault("_kept_versions", {})
        for i, (p, g) in enumerate(zip(params, kept)):
            grad = p.grad
            if grad is None or not _same_memory(g, grad):
                continue
            if self._by_reference:
                versions[id(p)] = g._version
                continue
            versions.pop(id(p), None)
            spare = spares[i]
            if (spare is not None and spare.shape == g.shape and spare.dtype == g.dtype
                    and spare.device == g.device and not _same_memory(spare, grad)):
                out[i] = spare.copy_(g)
            else:
                out[i] = g.clone()
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:  # p.grad is about to be zeroed in place: kept references become copies
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st or p.grad is None:
                        continue
                    for k in self._KEPT:
                        x = st.get(k)
                        if x is not None and _same_memory(x, p.grad):
                            st[k] = x.clone()
        super().zero_grad(set_to_none)
        written = self.__dict__.get("_written")
        if written and not set_to_none:  # gradients a closure wrote, zeroed by us: still ours
            for group in self.param_groups:
                for p in group["params"]:
                    mine = written.get(id(p))
                    if mine is not None and mine[0] is p.grad:
                        written[id(p)] = (p.grad, p.grad._version)

    def _diverged(self, group: dict, div: "_divergence.Divergence") -> None:
        """Report divergence of ``group`` (nothing of the step was applied). A hypergradient that
        is not finite because the gradient is not is reported as the gradient's."""
        if div.quantity == "hypergradient h" and any(
                p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in group["params"]):
            div = dataclasses.replace(div, quantity="the gradient p.grad (so the training loss or its backward)")
        if self.raise_on_divergence:
            raise div.error(note=" (nothing was changed)")
        group["diverged_at"] = div.step
        div.warn(f"{type(self).__name__}: ", "; the step was not applied and this param group is no longer "
                 "updated (group['diverged_at'])", stacklevel=4)


class OnlineOptimizer(DropIn):
    """The shared ``torch.optim`` wrapper around :class:`hgtoolkit.online.Engine` (module
    docstring); subclasses say which dynamics and hyper-settings a group has."""

    # The engine's ``owns_grad`` (fastpaths.Plan.choose): HD keeps z as d_t = −z_{t+1} itself, not a copy of −d_t
    # (SGDHD, whose μ is always 0). For plain SGD d_t is p.grad, which ``_keep`` keeps by
    # reference or copies. False: z holds −d_t (AdamHD writes its direction into z's own buffer;
    # MARTHE's groups may switch to μ ≠ 0, whose z has that sign).
    _direction_as_z = False
    _KEPT = ("z_w",)

    def __init__(self, params: Iterable, defaults: dict, *, objective: str = "train",
                 mu_rule: Callable | None = None, raise_on_divergence: bool = False,
                 module: torch.nn.Module | None = None):
        if not isinstance(objective, str) or objective not in online.OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {online.OBJECTIVES}")
        self.objective = objective
        self.mu_rule = mu_rule
        defaults = {"lr_floor": 0.0, "lr_max": None, "divergence_factor": 2.0, **defaults}
        super().__init__(params, defaults, raise_on_divergence=raise_on_divergence)
        self._guard = None if module is None else _guards.ModuleGuard(module)

    # -- subclass hooks -------------------------------------------------------------------
    def _dynamics(self, group: dict) -> _dynamics.Dynamics:
        raise NotImplementedError

    def _hyper_kwargs(self, group: dict) -> dict:
        """Keyword arguments of :func:`online.hyper_config` for this group besides its options
        that are settings of :class:`~hgtoolkit.settings.OnlineSettings` (which go as they are)."""
        return {}

    # -- groups ---------------------------------------------------------------------------
    @property
    def _options(self) -> tuple:
        """The group options a setup depends on: every option the constructor declares (its
        ``defaults``) but the base LR, which schedulers move, and η_0 of the hyper-update."""
        return ("initial_lr_for_hyper", *(k for k in self.defaults if k != "lr"))

    def _config(self, group: dict) -> online.HyperConfig:
        """The group's validated hyper-settings (rebuilt when its options change)."""
        return self._setup(group)[0]

    def _setup(self, group: dict) -> tuple:
        """(HyperConfig, dynamics, Engine, Settings tensors) of a group, kept while its options
        (and device) stay the same: compared by value at each step, without building anything."""
        values = [group.get(k) for k in self._options]
        values.append(group["params"][0].device)
        cache = self.__dict__.setdefault("_setups", {})
        hit = cache.get(id(group))
        if hit is not None and hit[0] == values:
            return hit[1]
        cfg = self._make_config(group)
        dyn = self._dynamics(group)
        # a single run: the engine writes s_{t+1}, z_{t+1} straight into p and this optimizer's state
        engine = online.engine_for(cfg, dyn, single_run=True, owns_grad=self._direction_as_z)
        setup = (cfg, dyn, engine, cfg.settings(online.HYPER_DTYPE, values[-1]))
        # a mutable option (a dict) is compared with a copy of what it was
        cache[id(group)] = ([dict(v) if isinstance(v, dict) else v for v in values], setup)
        return setup

    def _make_config(self, group: dict) -> online.HyperConfig:
        """:func:`online.hyper_config` of the group's options that are online settings (``lr``:
        η_0 of the hyper-update; ``optimizer``: the dynamics, built by :meth:`_dynamics`)."""
        schema = _settings.specs(_settings.OnlineSettings)
        named = group.get(_GIVEN) or ()  # none: a state dict saved before groups kept it

        def passed(k):  # a setting with conditions goes when given, or set off its default since
            return not schema[k][1].conditions() or k in named or group[k] != schema[k][0]
        given = {k: group[k] for k in self.defaults if k in schema and k not in ("lr", "optimizer") and passed(k)}
        return online.hyper_config(lr=group["initial_lr_for_hyper"], objective=self.objective,
                                   mu_rule=self.mu_rule, **{**given, **self._hyper_kwargs(group)})

    def add_param_group(self, param_group: dict) -> None:
        explicit = {_errors.OLD_NAMES.get(k, k) for k in param_group if k != "params"}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # the online settings this group was given (the constructor's, its own), state_dict-safe:
        # a conditional one passed at its default still counts (settings.check_used)
        group.setdefault(_GIVEN, sorted(set(getattr(self, "_given_options", ())) | explicit))
        group.setdefault("initial_lr_for_hyper", group["lr"])
        self._dynamics(group)  # validates the dynamics' options
        cfg = self._config(group)
        for key, value in _GROUP_STATE.items():
            group.setdefault(key, value)
        if group["hypergrad_lr_t"] is None:
            group["hypergrad_lr_t"] = cfg.beta0
        if group["mu_t"] is None:
            group["mu_t"] = cfg.mu0

    @property
    def needs_closure(self) -> bool:
        """True when a training-loss closure is required (some group has μ ≠ 0: H_t z)."""
        return any(self._config(g).needs_hvp for g in self.param_groups)

    # -- gradients ------------------------------------------------------------------------
    @staticmethod
    def _trainable(group: dict) -> list:
        return [p for p in group["params"] if p.requires_grad]

    def _user_gradients(self) -> bool:
        """The gradient contract (docs/dropins.md), decided when ``step`` gets a closure: True when
        some ``p.grad`` holds the user's gradient (a tensor this optimizer did not write: the
        user's ``backward()``, then clipping, hooks, unscaling); the step then uses ``p.grad`` and
        the closure gives the loss and H_t z only. False when every ``p.grad`` is None or the
        closure gradient this optimizer wrote at its last step, unchanged: the closure's new
        gradient replaces it (also when zeroed in place since). A gradient this optimizer wrote and
        that was changed in place since (clipped after the step, or ``backward()`` accumulated into
        it) raises: it would be neither."""
        written = self.__dict__.setdefault("_written", {})
        user, stale, changed = False, [], []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                mine = written.get(id(p))
                if mine is None or mine[0] is not g:
                    user = True
                elif g._version != mine[1]:
                    changed.append(p)
                else:
                    stale.append(p)
        # zeroed in place (a module's zero_grad(set_to_none=False)) is "no gradient", not a change
        if changed and any(bool(p.grad.any()) for p in changed):
            raise RuntimeError(
                f"{type(self).__name__}.step(closure): p.grad holds the gradient this optimizer "
                f"computed from the closure at its last step, changed in place since (by "
                f"clipping or a hook after step(), or backward() accumulating into it without "
                f"zero_grad()), so it is neither that gradient nor one of yours: call "
                f"opt.zero_grad() before loss.backward() (the step then uses your p.grad, "
                f"clipped or not), or leave p.grad alone and let the closure compute it")
        stale += changed
        if user:  # the closure gradients of the last step belong to no backward of this one
            for p in stale:
                p.grad = None
        return user

    def _closure_grads(self, closure: Callable, hvp_groups: list[int], write: bool = True,
                       second_order: bool = False) -> tuple[torch.Tensor, dict]:
        """Run the closure: its loss, H_kk z_k per group in ``hvp_groups`` (one more backward through
        the gradient each) and, with ``write``, its gradient g into p.grad for every trainable
        parameter (else p.grad is the user's and is left alone; checked unchanged).
        ``second_order``: some group needs H z at its later steps (a torch.compile'd loss is
        refused at the first step, not the second)."""
        groups = self.param_groups
        flat = [p for g in groups for p in self._trainable(g)]
        before = None if write else [(p.grad, None if p.grad is None else p.grad._version) for p in flat]
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"closure must return the loss as a one-element tensor, got "
                                f"{type(loss).__name__}")
            differentiate = write or bool(hvp_groups)
            if differentiate and not loss.requires_grad:
                raise RuntimeError("the loss returned by the closure does not depend on the "
                                   "optimizer's trainable parameters (computed under no_grad?); it "
                                   "must be computed from them and must NOT call backward() itself")
            if second_order:
                _guards.refuse_compiled(self, loss)
            by_param, hz = {}, {}
            try:
                if differentiate:
                    grads = torch.autograd.grad(loss, flat, create_graph=bool(hvp_groups), allow_unused=True)
                    by_param = {id(p): g for p, g in zip(flat, grads)}
                for i, k in enumerate(hvp_groups):
                    hz[k] = self._hvp(groups[k], by_param, retain=i < len(hvp_groups) - 1)
            except RuntimeError as exc:
                _guards.explain_double_backward(self, exc)
                raise RuntimeError(f"could not differentiate the loss returned by the closure: it must "
                                   f"be computed from the current parameters with autograd enabled and "
                                   f"must NOT call backward() itself ({exc})") from exc
        if before is not None:
            if any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in zip(flat, before)):
                raise RuntimeError(f"{type(self).__name__}.step(closure): the closure changed p.grad (it "
                                   f"must return the loss without calling backward(); the step uses the "
                                   f"gradient you left in p.grad)")
        elif write:
            written = self.__dict__.setdefault("_written", {})
            written.clear()
            for p in flat:
                g = by_param[id(p)]
                p.grad = None if g is None else g.detach()
                if g is not None:
                    written[id(p)] = (p.grad, p.grad._version)
        return loss.detach(), hz

    def _hvp(self, group: dict, by_param: dict, retain: bool) -> dict:
        """{id(p): H z_w} over the group's trainable parameters whose gradient depends on the
        parameters (zero where nothing depends on p), by one backward along z_w."""
        ps, gs, zs = [], [], []
        for p in self._trainable(group):
            g = by_param[id(p)]
            z = self.state[p].get("z_w") if g is not None and g.requires_grad else None
            if z is not None:
                ps.append(p), gs.append(g), zs.append(z)
        if not ps:
            return {}
        out = torch.autograd.grad(gs, ps, grad_outputs=zs, retain_graph=retain, allow_unused=True)
        return {id(p): h for p, h in zip(ps, out) if h is not None}

    def _val_grads(self, val_closure: Callable | None) -> dict:
        if val_closure is None:
            raise ValueError("val_closure is required with objective='val': it must return the "
                             "validation loss at the current parameters")
        flat = [p for g in self.param_groups for p in self._trainable(g)]
        with torch.enable_grad(), _guards.extra_forward(self._guard, replay=False):
            value = val_closure()
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError("val_closure must return the validation loss as a one-element tensor")
            grads = torch.autograd.grad(value, flat, allow_unused=True)
        return {p: (torch.zeros_like(p) if g is None else g) for p, g in zip(flat, grads)}

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None, val_closure: Callable | None = None):
        groups = self.param_groups
        cfgs = [self._config(g) for g in groups]
        hvp_groups = [k for k, (g, c) in enumerate(zip(groups, cfgs))
                      if c.needs_hvp and g["t"] > 0 and g["diverged_at"] is None]
        loss, hz = None, {}
        users = closure is not None and self._user_gradients()
        self._observe_grads(backward_driven=closure is None or users)
        if closure is not None:
            # the closure is an extra forward when p.grad is the user's: buffers read-only, the
            # user's forward's RNG replayed (with module=); else it is the step's only forward
            with _guards.extra_forward(self._guard if users else None, replay=True):
                loss, hz = self._closure_grads(closure, hvp_groups, write=not users,
                                               second_order=any(c.needs_hvp for c in cfgs))
        elif hvp_groups:
            raise ValueError("closure is required: with μ ≠ 0 (RTHO/MARTHE) the optimizer needs "
                             "H_t z from a closure returning the training loss (without backward())")
        vgrads = None
        if self.objective == "val" and any(g["t"] > 0 for g in groups):
            vgrads = self._val_grads(val_closure)
        for k, (group, cfg) in enumerate(zip(groups, cfgs)):
            if group["diverged_at"] is None:
                self._group_step(group, cfg, loss, hz.get(k), vgrads)
        if self._guard is not None:
            self._guard.step_done()
        return loss

    def _group_step(self, group: dict, cfg: online.HyperConfig, loss, hz: dict | None,
                    vgrads: dict | None) -> None:
        params = self._active(group)
        if not params:
            return
        _, dyn, engine, settings = self._setup(group)
        t = group["t"]
        ref = params[0]
        memo = self.__dict__.setdefault("_scalar_memo", {}).setdefault(id(group), {})

        def f(name, x):
            """The group's number ``name`` as a tensor: the engine's own tensor of the last step
            while the group still holds its value (a scalar tensor costs as much as a tiny update)."""
            hit = memo.get(name)
            if hit is not None and (hit[0] == x or (x != x and hit[0] != hit[0])):
                return hit[1]
            memo[name] = (x, torch.tensor(x, dtype=online.HYPER_DTYPE, device=ref.device))
            return memo[name][1]

        if "_fresh" not in memo:
            memo["_fresh"] = {k: torch.tensor(v, dtype=torch.int64, device=ref.device)
                              for k, v in (("diverged_at", -1), ("why", 0), ("beta_capped", 0))}
        # the engine state of the parameters that take part in this step
        sts = [self.state[p] for p in params]
        for p, st in zip(params, sts):
            if not st:  # first step of this parameter: its moments, zero tangent, no update yet
                s0 = dyn.init(p.detach())
                st.update({k: v for k, v in s0.items() if k != "w"}, n_updates=0)
        keys = [k for k in sts[0] if not k.startswith("z_") and k not in ("g_prev", "n_updates")]
        # the tangent: of w only for HD (A_t never applied), of the whole state otherwise
        zkeys = ["w", *keys] if engine.needs_hvp else ["w"]
        counts = [st["n_updates"] for st in sts]
        fg = self._flat_group(group, params, engine, counts)
        for p, st in zip(params, sts if fg is None else ()):  # (the flat buffers start at zero)
            for k in zkeys:
                if "z_" + k not in st:
                    st["z_" + k] = torch.zeros_like(p)
        prev_lr = group["effective_lr"] if group["prev_lr"] is None else group["prev_lr"]
        grads = [p.grad for p in params]
        if fg is not None:  # the fast path: one flat leaf per key (hgtoolkit.fastpaths.FlatGroup), same engine
            opt, z, g_prev, grads = fg.leaves(sts, grads, keys, zkeys, engine.mu_rule is not None)
        else:
            opt = {"w": [p.detach() for p in params], **{k: [st[k] for st in sts] for k in keys}}
            z = {k: [st["z_" + k] for st in sts] for k in zkeys}
            g_prev = ([st["g_prev"] if "g_prev" in st else torch.zeros_like(p) for p, st in zip(params, sts)]
                      if engine.mu_rule is not None else None)
        state = online.OnlineState(
            opt=opt, z=z,
            # a constant β or μ is the group's option as it is now; an adaptive one its value
            lr=f("lr", prev_lr), beta=f("hypergrad_lr_t", group["hypergrad_lr_t"] if cfg.beta_adaptive else cfg.beta0),
            mu=f("mu_t", group["mu_t"] if cfg.mu_rule is not None else cfg.mu0),
            counter=f("mu_counter", group["mu_counter"]), h=f("hypergrad", group["hypergrad"]),
            g_prev=g_prev, ref_loss=f("ref_loss", group["ref_loss"]), settings=settings, **memo["_fresh"])
        kept_z = engine.plan.direction_as_z  # z = d_t, which may be a kept p.grad
        if kept_z:
            self._check_kept(params, [st["z_w"] for st in sts])
        base = group["lr"]
        scale = group["lr_scale"]
        if t > 0:
            if vgrads is None:
                v = engine.objective_gradient(state, grads)
            else:
                v = [vgrads[p] for p in params]
                v = v if fg is None else [fg.gather("in:v", v)]
            state = engine.hyper_update(state, v, t)
            learnt = float(state.lr)
            # the scheduler contract: m_t = η_t / (base LR of step t−1); η_t = base_t · m_t
            prev_base = base if group["prev_base"] is None else group["prev_base"]
            scale = learnt / prev_base if prev_base > 0 else scale
        if t > 0 and base == prev_base:  # the base LR stayed: η_t is the engine's own
            lr = learnt
            memo["lr"] = (lr, state.lr)
        else:
            lr = base * scale
            state = state._replace(lr=f("lr", lr))
        if loss is not None:
            state = engine.check_loss(state, loss.to(online.HYPER_DTYPE), None, t)
        if int(state.diverged_at) >= 0:  # the step is not applied
            self._engine_diverged(group, state, loss, t)
            return
        hvp = None
        if engine.needs_hvp and t > 0:
            hz = hz or {}
            hvp = [hz.get(id(p)) for p in params]
            hvp = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvp)]
            hvp = hvp if fg is None else [fg.gather("in:hvp", hvp)]
        # in place: p (the flat path: its buffer), moments, z
        new = (_optimizer_step(engine, state, grads, counts, hvp) if fg is None else
               engine.optimizer_step(state, grads, counts[0], hvp))
        if fg is not None:
            fg.write_back(grads[0] if engine.mu_rule is not None else None)
            for st in sts:
                st["n_updates"] += 1
        if kept_z:
            for st, z in zip(sts, self._keep(params, new.z["w"], [st["z_w"] for st in sts])):
                st["z_w"] = z
        for i, st in enumerate(sts if fg is None else ()):
            if engine.mu_rule is not None:  # the μ rule's ∇L_{t−1}, copied (p.grad is yours)
                prev = st.get("g_prev")
                if prev is not None and prev.shape == grads[i].shape and prev.dtype == grads[i].dtype:
                    prev.copy_(grads[i])  # into last step's copy, used up by this step's μ rule
                else:
                    st["g_prev"] = grads[i].clone()
            st["n_updates"] += 1
        # a parameter this step skips keeps w, so its tangent decays: z_{t+1} = μ_t z_t (0 for HD)
        if len(params) < len(group["params"]):
            taking_part = set(map(id, params))
            for p in group["params"]:
                st = self.state.get(p)
                if st and id(p) not in taking_part:
                    st.update({k: v * new.mu.to(v.dtype) for k, v in st.items() if k.startswith("z_")})
        numbers = {"hypergrad_lr_t": new.beta, "mu_t": new.mu, "mu_counter": new.counter,
                   "hypergrad": new.h, "ref_loss": new.ref_loss}
        numbers = {k: (float(v), v) for k, v in numbers.items()}
        memo.update(numbers)
        group.update({k: x for k, (x, _) in numbers.items()}, lr_scale=scale, effective_lr=lr,
                     prev_lr=lr, prev_base=base, t=t + 1,
                     hypergrad_lr_capped=group["hypergrad_lr_capped"] + int(new.beta_capped))

    # the flat-buffer fast path (hgtoolkit.fastpaths.FlatGroup): None = where it pays, True = wherever it
    # applies, False = never (the reference path)
    _flat_buffers: bool | None = None

    def _flat_group(self, group: dict, params: list, engine: online.Engine, counts: list) -> "fastpaths.FlatGroup | None":
        """The group's flat buffers (over the parameters taking part; rebuilt when they change)
        when this step takes the fast path, as the engine's plan chooses it
        (:meth:`hgtoolkit.fastpaths.Plan.flat_group`: μ ≠ 0, all parameters at the same update
        count, one dtype and device, and unless forced many small tensors)."""
        groups = self.__dict__.setdefault("_flat_groups", {})
        fg = engine.plan.flat_group(engine.needs_hvp, params, same_count=len(set(counts)) == 1,
                                    force=self._flat_buffers, built=groups.get(id(group)))
        if fg is not None:
            groups[id(group)] = fg
        return fg

    def _engine_diverged(self, group: dict, state: online.OnlineState, loss, t: int) -> None:
        why = int(state.why)
        value = float(loss) if why in (1, 3) and loss is not None else (float(state.lr) if why == 5 else None)
        self._diverged(group, _divergence.from_code(t, why, value))


def by_count(counts: list[int]) -> dict[int, list[int]]:
    """{count: indices}: the parameters of a group that share a per-parameter update count (the
    ``t`` of Adam's bias correction, as torch.optim counts it: updates of that parameter)."""
    out: dict[int, list[int]] = {}
    for i, c in enumerate(counts):
        out.setdefault(c, []).append(i)
    return out


def _optimizer_step(engine: online.Engine, state: online.OnlineState, grads: list, counts: list[int],
                    hvp: list | None) -> online.OnlineState:
    """``engine.optimizer_step`` with each parameter at its own update count (one call per count;
    one call in all when every parameter took part in every step)."""
    buckets = by_count(counts)
    if len(buckets) == 1:
        return engine.optimizer_step(state, grads, counts[0], hvp)
    n = len(grads)
    opt = {k: [None] * n for k in state.opt}
    z = {k: [None] * n for k in state.z}
    for c, idx in buckets.items():
        sub = lambda tree: {k: [v[i] for i in idx] for k, v in tree.items()}
        part = engine.optimizer_step(state._replace(opt=sub(state.opt), z=sub(state.z)),
                                     [grads[i] for i in idx], c, None if hvp is None else [hvp[i] for i in idx])
        for tree, new in ((opt, part.opt), (z, part.z)):
            for k, leaves in new.items():
                for i, x in zip(idx, leaves):
                    tree[k][i] = x
    return state._replace(opt=opt, z=z, g_prev=grads)


class SGDHD(OnlineOptimizer):
    r"""SGD-HD and SGDN-HD (Baydin et al. 2018): SGD (optionally Nesterov/heavy-ball momentum,
    as ``torch.optim.SGD`` with dampening 0) whose LR follows

        η_t = η_{t−1} − β h_t,   h_t = (∇L_t(w_t) + wd·w_t)·z_t,   z_t = B_{t−1} = −d_{t−1}

    (d the update direction; SGD: η_t = η_{t−1} + β g̃_t·g̃_{t−1}), computed before step t from
    the gradient step t uses — no extra evaluation. ``hypergrad_lr`` is β; ``lr_floor=None``
    (Baydin's choice) lets η go negative, ``lr_floor=0.0`` clips it.
    ``step(closure=None)``: the closure, if given, returns the loss without calling backward().
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, hypergrad_lr: float = 1e-3,
                 lr_floor: float | None = None, lr_max: float | None = None,
                 divergence_factor: float | None = 2.0, raise_on_divergence: bool = False,
                 module: torch.nn.Module | None = None):
        _nonneg(hypergrad_lr, "hypergrad_lr")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        hypergrad_lr=hypergrad_lr, lr_floor=lr_floor, lr_max=lr_max,
                        divergence_factor=divergence_factor)
        super().__init__(params, defaults, objective="train", raise_on_divergence=raise_on_divergence,
                         module=module)

    _direction_as_z = True

    def _dynamics(self, group):
        return _dynamics.SGD(momentum=group["momentum"], nesterov=group["nesterov"],
                             weight_decay=group["weight_decay"])

    def _hyper_kwargs(self, group):
        return {"method": "hd", "hypergrad_lr": _nonneg(group["hypergrad_lr"], "hypergrad_lr")}


class AdamHD(OnlineOptimizer):
    r"""Adam-HD (Baydin et al. 2018): Adam (as ``torch.optim.Adam``) whose LR follows
    η_t = η_{t−1} − β ṽ_t·z_t with z_t = B_{t−1} = −m̂_{t−1}/(√v̂_{t−1} + ε), one LR per
    param group (Baydin's code keeps one per parameter tensor and puts ε inside the bias
    correction). ``hypergrad_lr`` is β (the paper uses 1e-8); see :class:`SGDHD` for the rest."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, hypergrad_lr: float = 1e-8,
                 lr_floor: float | None = None, lr_max: float | None = None,
                 divergence_factor: float | None = 2.0, raise_on_divergence: bool = False,
                 module: torch.nn.Module | None = None):
        _nonneg(hypergrad_lr, "hypergrad_lr")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hypergrad_lr=hypergrad_lr, lr_floor=lr_floor, lr_max=lr_max,
                        divergence_factor=divergence_factor)
        super().__init__(params, defaults, objective="train", raise_on_divergence=raise_on_divergence,
                         module=module)

    def _dynamics(self, group):
        b1, b2 = group["betas"]
        return _dynamics.Adam(beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"])

    def _hyper_kwargs(self, group):
        return {"method": "hd", "hypergrad_lr": _nonneg(group["hypergrad_lr"], "hypergrad_lr")}


class MARTHE(OnlineOptimizer):
    r"""MARTHE (Donini et al. 2020) — and, with ``method="rtho"``/``"hd"``, RTHO and HD — as a
    ``torch.optim`` optimizer over any :mod:`hgtoolkit.dynamics` (``optimizer="sgd"``,
    ``"nesterov"``, ``"adam"``, or a Dynamics object).

    Arguments mirror :func:`hgtoolkit.online.run`: the param groups' options are the settings
    of :class:`~hgtoolkit.settings.OnlineSettings` declared ``dropin`` (``method``,
    ``hypergrad_lr`` = β (number or ``"auto"``), ``mu`` (number in [0, 1] or ``"auto"``),
    ``kappa``, ``hypergrad_lr_init``, ``hypergrad_lr_rule``, ``hypergrad_lr_bound``,
    ``lr_floor`` (default 0), ``lr_max``, ``divergence_factor``; the old ``beta``, ``beta0``, …
    are accepted with a ``FutureWarning`` until 0.2), with their defaults there;
    ``mu_rule`` (a tensor function), ``objective`` (``"val"`` needs ``val_closure``).
    ``step(closure, val_closure=None)``: ``closure`` returns the training loss on the current
    minibatch without calling backward() (required whenever μ ≠ 0); ``val_closure`` the
    validation loss (required for ``objective="val"``). Returns the training loss (detached).
    """

    @_settings.takes(_settings.OnlineSettings, only=_settings.dropin_option)
    def __init__(self, params: Iterable, lr: float = 1e-3, *, mu_rule: Callable | None = None,
                 objective: str = "val", optimizer: "str | _dynamics.Dynamics" = "sgd",
                 raise_on_divergence: bool = False, module: torch.nn.Module | None = None,
                 **options: Any):
        options = _settings.bind(_settings.OnlineSettings, options, "MARTHE", only=_settings.dropin_option)
        self._given_options = options.given
        dyn = _dynamics.get(optimizer)
        defaults = dict(lr=lr, **options, optimizer=dyn.config())
        super().__init__(params, defaults, objective=objective, mu_rule=mu_rule,
                         raise_on_divergence=raise_on_divergence, module=module)

    def _dynamics(self, group):
        cfg = group["optimizer"]
        return cfg if isinstance(cfg, _dynamics.Dynamics) else _dynamics.from_config(cfg)


