r"""Optimizer dynamics as pure step functions ``state' = step(state, grad, lr, t)``.

Every optimizer of the toolkit is one frozen dataclass with two pure methods,
``init(params) -> state`` and ``step(state, grad, lr, t, **hyper) -> state``. The state is
a dict of pytrees (``"w"``: the parameters, plus the optimizer's moments), the learning
rate ``lr`` (η_t) is an explicit, differentiable input, and so is every other
hyperparameter when passed as a keyword (``momentum=``, ``beta1=``, …): this is what the
exact hypergradient (``torch.func.vjp``/``jvp`` of one step), the online methods and the
hyperoptimizer towers all differentiate. ``t`` is the 0-based step index (Adam's bias
correction uses it).

The formulas are those of ``torch.optim`` (weight decay added to the gradient).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._tree import tree_map, tree_zeros_like

__all__ = ["Dynamics", "SGD", "Adam", "AdaGrad", "RMSProp", "sgd", "momentum", "nesterov",
           "adam", "adagrad", "rmsprop", "get", "NAMES"]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with derivative 0 (not ∞·0 = NaN) where v == 0, e.g. gradients of dead ReLU units."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))),
                       torch.zeros_like(v))


@dataclass(frozen=True)
class Dynamics:
    """Base class: a pure optimizer step with its hyperparameters as dataclass fields.

    ``hyperparameters`` names the fields (besides the LR) that may be passed to ``step`` as
    tensors to make them differentiable; ``constraints`` says which range keeps each valid.
    """

    hyperparameters: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = "dynamics"

    def init(self, params: Any) -> dict:
        raise NotImplementedError

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        raise NotImplementedError

    @staticmethod
    def params(state: dict) -> Any:
        """The parameters w inside an optimizer state."""
        return state["w"]

    def _hyper(self, hyper: dict) -> dict:
        unknown = set(hyper) - set(self.hyperparameters)
        if unknown:
            raise TypeError(f"{type(self).__name__}.step got unknown hyperparameter(s) "
                            f"{sorted(unknown)}; tunable: {list(self.hyperparameters)}")
        return {k: hyper.get(k, getattr(self, k)) for k in self.hyperparameters}

    def _decayed(self, grad: Any, w: Any) -> Any:
        wd = getattr(self, "weight_decay", 0.0)
        return grad if wd == 0 else tree_map(lambda g, p: g + wd * p, grad, w)

    def config(self) -> dict:
        """JSON-serialisable description, e.g. for result records."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and (value != value or value < 0):
                raise ValueError(f"{type(self).__name__}: {field.name} must be ≥ 0, got {value}")


@dataclass(frozen=True)
class SGD(Dynamics):
    r"""SGD with optional (Nesterov) momentum, as ``torch.optim.SGD`` (dampening 0).

    b_{t+1} = m·b_t + g_t;  d_t = g_t + m·b_{t+1} (Nesterov) or b_{t+1} (heavy ball; g_t if m = 0);
    w_{t+1} = w_t − η_t d_t.
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("momentum",)

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.momentum == 0 and not self.nesterov:
            return "sgd"
        return "nesterov" if self.nesterov else "momentum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum >= 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")

    def init(self, params: Any) -> dict:
        if self.momentum == 0 and not self.nesterov:
            return {"w": params}
        return {"w": params, "b": tree_zeros_like(params)}

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        m = self._hyper(hyper)["momentum"]
        w = state["w"]
        g = self._decayed(grad, w)
        if "b" not in state:
            return {"w": tree_map(lambda p, d: p - lr * d, w, g)}
        b = tree_map(lambda bb, gg: m * bb + gg, state["b"], g)
        d = tree_map(lambda gg, bb: gg + m * bb, g, b) if self.nesterov else b
        return {"w": tree_map(lambda p, dd: p - lr * dd, w, d), "b": b}


@dataclass(frozen=True)
class Adam(Dynamics):
    r"""Adam with bias correction, as ``torch.optim.Adam``.

    m_{t+1} = β1 m_t + (1−β1) g_t;  v_{t+1} = β2 v_t + (1−β2) g_t²;
    m̂ = m_{t+1}/(1−β1^{t+1});  v̂ = v_{t+1}/(1−β2^{t+1});  w_{t+1} = w_t − η_t m̂/(√v̂ + ε).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("beta1", "beta2")
    name: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"Adam: {k} must be in [0, 1), got {getattr(self, k)}")

    def init(self, params: Any) -> dict:
        return {"w": params, "m": tree_zeros_like(params), "v": tree_zeros_like(params)}

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        h = self._hyper(hyper)
        b1, b2 = h["beta1"], h["beta2"]
        w = state["w"]
        g = self._decayed(grad, w)
        m = tree_map(lambda mm, gg: b1 * mm + (1 - b1) * gg, state["m"], g)
        v = tree_map(lambda vv, gg: b2 * vv + (1 - b2) * gg * gg, state["v"], g)
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        w = tree_map(lambda p, mm, vv: p - lr * (mm / c1) / (_safe_sqrt(vv / c2) + self.eps), w, m, v)
        return {"w": w, "m": m, "v": v}


@dataclass(frozen=True)
class AdaGrad(Dynamics):
    r"""AdaGrad: G_{t+1} = G_t + g_t²;  w_{t+1} = w_t − η_t g_t/(√G_{t+1} + ε)."""

    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    weight_decay: float = 0.0
    name: ClassVar[str] = "adagrad"

    def init(self, params: Any) -> dict:
        return {"w": params, "G": tree_map(lambda p: torch.full_like(p, self.initial_accumulator_value), params)}

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        self._hyper(hyper)
        g = self._decayed(grad, state["w"])
        G = tree_map(lambda a, gg: a + gg * gg, state["G"], g)
        w = tree_map(lambda p, gg, a: p - lr * gg / (_safe_sqrt(a) + self.eps), state["w"], g, G)
        return {"w": w, "G": G}


@dataclass(frozen=True)
class RMSProp(Dynamics):
    r"""RMSProp: v_{t+1} = α v_t + (1−α) g_t²;  w_{t+1} = w_t − η_t g_t/(√v_{t+1} + ε)."""

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("alpha",)
    name: ClassVar[str] = "rmsprop"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha < 1:
            raise ValueError(f"RMSProp: alpha must be in [0, 1), got {self.alpha}")

    def init(self, params: Any) -> dict:
        return {"w": params, "v": tree_zeros_like(params)}

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        a = self._hyper(hyper)["alpha"]
        g = self._decayed(grad, state["w"])
        v = tree_map(lambda vv, gg: a * vv + (1 - a) * gg * gg, state["v"], g)
        w = tree_map(lambda p, gg, vv: p - lr * gg / (_safe_sqrt(vv) + self.eps), state["w"], g, v)
        return {"w": w, "v": v}


def sgd(momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> SGD:
    """Plain SGD, or heavy-ball / Nesterov momentum when ``momentum`` > 0."""
    return SGD(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def momentum(momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    return SGD(momentum=momentum, weight_decay=weight_decay)


def nesterov(momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    return SGD(momentum=momentum, nesterov=True, weight_decay=weight_decay)


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> Adam:
    return Adam(beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)


def adagrad(eps: float = 1e-10, weight_decay: float = 0.0) -> AdaGrad:
    return AdaGrad(eps=eps, weight_decay=weight_decay)


def rmsprop(alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0) -> RMSProp:
    return RMSProp(alpha=alpha, eps=eps, weight_decay=weight_decay)


NAMES = {"sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adam": adam,
         "adagrad": adagrad, "rmsprop": rmsprop}


def get(optimizer: "str | Dynamics", argname: str = "optimizer") -> Dynamics:
    """Resolve ``"sgd" | "momentum" | "nesterov" | "adam" | "adagrad" | "rmsprop"`` or a Dynamics."""
    if isinstance(optimizer, Dynamics):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in NAMES:
            raise ValueError(f"unknown {argname} {optimizer!r}; choose one of {sorted(NAMES)} "
                             "or pass a hgtoolkit.dynamics object")
        return NAMES[key]()
    raise TypeError(f"{argname} must be a name or a hgtoolkit.dynamics.Dynamics, "
                    f"got {type(optimizer).__name__}")


def from_config(config: dict) -> Dynamics:
    """Rebuild a Dynamics from its :meth:`Dynamics.config` dict (as stored in result records)."""
    if not isinstance(config, dict) or "name" not in config:
        raise TypeError(f"config must be a dict from Dynamics.config() with a 'name', got {config!r}")
    base = get(config["name"], argname="config['name']")
    names = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in config.items() if k in names})
