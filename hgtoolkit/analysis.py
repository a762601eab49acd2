r"""How far is an online hypergradient estimate from the exact hypergradients?

An online method (HD, RTHO, MARTHE — ``hgtoolkit.online``) runs the recursion of docs/methods.md,
"Online methods: one recursion", once: at step t it uses η_t, takes the step
s_{t+1} = Φ_t(s_t, η_t), and forms the estimate

    h_{t+1} = ∇E(w_{t+1}) · z_{t+1},    z_{t+1} = μ·A_t z_t + B_t,    z_0 = 0,

which decides the next learning rate η_{t+1} = max(η_t − β h_{t+1}, 0). This module replays
the SAME trajectory (the schedule η_0 … η_{T−1} held fixed, steps Φ_t of
``trajectory.make_step``) with the exact engine and computes, for every t = 0 … T−1:

- one-step reference (HD horizon, μ = 0):
  d⁽¹⁾_t = ∂E(w_{t+1})/∂η_t = ∇E(w_{t+1}) · B_t;
- constant-LR reference (RTHO horizon, μ = 1):
  d⁽ᶜ⁾_t = Σ_{s≤t} ∂E(w_{t+1})/∂η_s = ∇E(w_{t+1}) · ζ_{t+1},  ζ_{t+1} = A_t ζ_t + B_t, ζ_0 = 0
  (the derivative of E(w_{t+1}) w.r.t. a learning rate shared by steps 0 … t);
- full-horizon hypergradient (what LRS-OPT descends): g_t = ∂f/∂η_t = ∂E(w_T)/∂η_t.

Both per-step references come from one forward pass: ``torch.func.jvp`` of Φ_t with two
tangent columns (``vmap``): column 0 is restarted at 0 before every step (it becomes B_t),
column 1 is carried over (it becomes ζ_{t+1}); both take LR tangent 1. g comes from one
reverse pass (:func:`hgtoolkit.exact.hypergradient`). Identities that tie them together (and
are tested): d⁽¹⁾_{T−1} = g_{T−1} and d⁽ᶜ⁾_{T−1} = Σ_t g_t.

Alignment convention
--------------------
``estimates[t]`` is compared with the references at index t, i.e. with derivatives w.r.t. η_t
evaluated at w_{t+1}. With ``alignment="after_step"`` (the default) ``estimates[t]`` must be
h_{t+1}: the estimate formed right after step t (which used η_t), the one that sets η_{t+1}.
With ``alignment="before_step"`` ``estimates[t]`` is h_t: the estimate available before step t
(formed after step t−1); then ``estimates[0]`` is ignored and step T−1 has no estimate (NaN
in the per-step arrays, left out of the summary). ``OnlineResult.hypergrads`` is "after_step"
(:func:`analyse_online` passes it as such).

E is ``problem.val_loss`` throughout. An online method that uses another objective (HD with
the next minibatch's training loss) is compared with these references as it is: the
difference is part of its approximation error.

Metrics (per step t, estimate h, reference d)
---------------------------------------------
- sign agreement: sign(h) = sign(d) (``numpy.sign``; an exact 0 only agrees with 0);
- relative error |h − d| / |d|, defined as 0 when h = d = 0 and +inf when d = 0 ≠ h;
- ratio h / d (NaN when d = 0).

Summary over t: cosine similarity h·d / (‖h‖‖d‖), Pearson and Spearman correlation, fraction of
sign agreement, median relative error, median ratio and norm ratio ‖h‖/‖d‖. Undefined values
(a zero vector's cosine, a constant vector's correlation) are NaN, never an exception.

"How far is the online LR *update* from LRS-OPT's?": the online updates Δη_t = η_{t+1} − η_t,
t = 0 … T−2 (= −β h_{t+1} where the LR was not clipped) are compared with −g_t over the same t:
``summary["lr_update"]`` holds their cosine (NaN for a constant schedule) and the sign
agreement over the ``n_moved`` steps where the LR changed (an unchanged LR has no direction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dynamics as _dynamics
from . import fastpaths as _fastpaths
from . import records
from ._tree import tree_dot
from .errors import moved
from .exact import hypergradient
from .divergence import VALIDATION_LOSS, check_finite
from .carried import CarriedBuffers
from .drive import BufferShare, drive
from .trajectory import autograd_gradient, autograd_gradient_hvp, check_lrs

__all__ = ["ExactReferences", "exact_references", "ApproximationReport", "analyse",
           "analyse_online", "compare", "summarise", "cosine_similarity", "sign_agreement",
           "relative_error", "ratio", "pearson", "spearman",
           "REFERENCES", "ALIGNMENTS", "horizon_ladder", "horizon_ladder_online"]

ALIGNMENTS = ("after_step", "before_step")
REFERENCES = ("one_step", "constant_lr", "full_horizon")
REFERENCE_LABELS = {
    "one_step": "one-step d⁽¹⁾ (HD horizon)",
    "constant_lr": "constant-LR d⁽ᶜ⁾ (RTHO horizon)",
    "full_horizon": "full horizon g (LRS-OPT)",
}


# ----------------------------------------------------------------------------- exact references

@dataclass
class ExactReferences:
    r"""Exact derivatives along one fixed trajectory, each of shape (T,), index t ↔ η_t.

    ``one_step[t]`` = ∂E(w_{t+1})/∂η_t; ``constant_lr[t]`` = Σ_{s≤t} ∂E(w_{t+1})/∂η_s;
    ``full_horizon[t]`` = ∂E(w_T)/∂η_t; ``val_losses[t]`` = E(w_{t+1});
    ``train_losses[t]`` = L_t(w_t); ``value`` = E(w_T).
    """

    lrs: torch.Tensor
    one_step: torch.Tensor
    constant_lr: torch.Tensor
    full_horizon: torch.Tensor
    val_losses: torch.Tensor
    train_losses: torch.Tensor
    value: torch.Tensor
    optimizer: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in REFERENCES}


class _Replay:
    """The fixed schedule ``lrs`` replayed by :func:`hgtoolkit.drive.drive` (μ = 1, η_t forced):
    per step the one-step column B_t and d_t = ∇E(w_{t+1})·(column)_w."""

    def __init__(self, problem, engine, lrs: torch.Tensor):
        self.problem, self.engine, self.lrs = problem, engine, lrs
        self.one_step, self.constant_lr = torch.empty_like(lrs), torch.empty_like(lrs)
        self.val_losses, self.train_losses = torch.empty_like(lrs), torch.empty_like(lrs)

    def gradient(self, w, z_w, t):
        if z_w is None:
            (g, loss), hz = autograd_gradient(self.problem.train_loss, w, t), None
        else:
            g, loss, hz = autograd_gradient_hvp(self.problem.train_loss, w, z_w, t)
        check_finite(loss, t)
        return g, loss, hz

    def objective(self, w, t, g, loss):
        return None, None

    def evaluate(self, t, w, value):
        return None

    def update(self, state, oracle, t):
        g, loss, hvp = oracle.grad, oracle.loss, oracle.hvp
        dyn = self.engine.dynamics
        state = state._replace(lr=self.lrs[t])
        _, b_t = _fastpaths.tangent(dyn, state.opt, g, self.lrs[t], t)
        return self.engine.optimizer_step(state, g, t, hvp), {"b": dyn.params(b_t), "loss": loss}

    def val_gradient(self, w):
        """(∇E(w), E(w))."""
        return autograd_gradient(self.problem.val_loss, w)

    def record(self, t, state, aux, pending):
        w = self.engine.dynamics.params(state.opt)
        gE, E = self.val_gradient(w)
        share = None
        if isinstance(gE, BufferShare):  # ⟨∇_b E, ζ_b⟩: the running statistics' part of d⁽ᶜ⁾
            gE, share = gE
        check_finite(E, t, w, VALIDATION_LOSS)
        self.one_step[t] = tree_dot(gE, aux["b"])  # B_t has no buffers part
        self.constant_lr[t] = tree_dot(gE, self.engine.dynamics.params(state.z))
        if share is not None:
            self.constant_lr[t] += share
        self.val_losses[t], self.train_losses[t] = E.detach(), aux["loss"].detach()
        return state

    def close(self, state, steps):
        return state


class _BufferedReplay(CarriedBuffers, _Replay):
    """:class:`_Replay` of a stateful problem: b_t and ζ_{t,b} carried (docs/models.md)."""

    objective = _Replay.objective  # v is not used: the references are formed in record

    def gradient(self, w, z_w, t):
        g, loss, dg = super().gradient(w, z_w, t)
        check_finite(loss, t)
        return g, loss, dg


def exact_references(problem, lrs: Any, optimizer: "str | _dynamics.Dynamics" = "sgd", *,
                     memory: "int | str | None" = None, progress: bool = False) -> ExactReferences:
    r"""d⁽¹⁾_t, d⁽ᶜ⁾_t and g_t for every t along the trajectory of the fixed schedule ``lrs``.

    Forward pass: the online engine (:class:`hgtoolkit.online.Engine`, μ = 1, η_t prescribed by
    ``lrs``) carries ζ_{t+1} = A_t ζ_t + B_t, the one-step column is B_t (the closed-form
    tangent of the update), and d_t = ∇E(w_{t+1})·(column)_w — the same gradients, HVPs and
    update as :func:`hgtoolkit.online.run`, so the replayed trajectory of an online run is its
    own to the last bit (also in float32). Reverse pass: g = ``hypergradient(problem, lrs,
    optimizer, mode="reverse")``.
    """
    from . import online
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    T = len(lrs)
    engine = online.Engine(dyn, objective="val", needs_hvp=True)
    state = engine.init(problem.params0, online.hyper_config("rtho", lr=0.0, hypergrad_lr=0.0))
    replay = (_BufferedReplay if problem.stateful else _Replay)(problem, engine, lrs)
    drive(engine, replay, state, T, progress=progress, desc="exact references")
    one_step, constant_lr, val_losses, train_losses = (replay.one_step, replay.constant_lr,
                                                       replay.val_losses, replay.train_losses)
    if not bool(torch.isfinite(one_step).all() and torch.isfinite(constant_lr).all()):
        raise FloatingPointError("the one-step/constant-LR derivatives have non-finite entries "
                                 "although training stayed finite")
    full = hypergradient(problem, lrs, dyn, mode="reverse", memory=memory,
                         progress=progress)
    return ExactReferences(lrs, one_step.detach(), constant_lr.detach(), full.grad, val_losses,
                           train_losses, full.value, dyn.config())


# ----------------------------------------------------------------------------- metrics

def _as_vector(x: Any, argname: str, allow_nonfinite: bool = False) -> np.ndarray:
    """``x`` as a 1-D float64 numpy array; ValueError/TypeError naming ``argname``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"{argname} must be real, got dtype {x.dtype}")
        x = x.to(torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{argname} must be a 1-D array of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{argname} must be 1-D (one value per step), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{argname} is empty")
    if not allow_nonfinite and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(f"{argname} contains NaN or inf at steps {bad[:10].tolist()}")
    return arr


def paired_arrays(estimate: Any, reference: Any, names=("estimate", "reference")) -> tuple[np.ndarray, np.ndarray]:
    h, d = _as_vector(estimate, names[0]), _as_vector(reference, names[1])
    if h.shape != d.shape:
        raise ValueError(f"{names[0]} has shape {h.shape} but {names[1]} has shape {d.shape}; "
                         "they must hold one value per step for the same steps")
    return h, d


def cosine_similarity(a: Any, b: Any) -> float:
    """a·b / (‖a‖‖b‖) over steps; NaN when either vector is zero."""
    a, b = paired_arrays(a, b, ("a", "b"))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def sign_agreement(estimate: Any, reference: Any) -> np.ndarray:
    """Per step: sign(h) == sign(d) (bool); an exact zero agrees only with zero."""
    h, d = paired_arrays(estimate, reference)
    return np.sign(h) == np.sign(d)


def relative_error(estimate: Any, reference: Any) -> np.ndarray:
    """Per step |h − d| / |d|; 0 where h = d = 0, +inf where d = 0 ≠ h."""
    h, d = paired_arrays(estimate, reference)
    err = np.abs(h - d)
    out = np.full_like(err, np.inf)
    nz = d != 0
    out[nz] = err[nz] / np.abs(d[nz])
    out[~nz & (err == 0)] = 0.0
    return out


def ratio(estimate: Any, reference: Any) -> np.ndarray:
    """Per step h / d; NaN where d = 0."""
    h, d = paired_arrays(estimate, reference)
    out = np.full_like(h, np.nan)
    nz = d != 0
    out[nz] = h[nz] / d[nz]
    return out


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation over steps; NaN when either vector is constant or has < 2 entries."""
    a, b = paired_arrays(a, b, ("a", "b"))
    if a.size < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their positions (scipy's
    ``rankdata`` default, without importing scipy.stats: ~1 s)."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    group = np.cumsum(np.r_[True, sx[1:] != sx[:-1]]) - 1
    counts = np.bincount(group)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # mean of positions start+1 … start+count
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when either is constant."""
    a, b = paired_arrays(a, b, ("a", "b"))
    return pearson(average_ranks(a), average_ranks(b))


def compare(estimate: Any, reference: Any) -> dict[str, np.ndarray]:
    """Per-step comparison: ``sign_agree`` (0/1), ``rel_err`` and ``ratio`` (see module doc)."""
    return {"sign_agree": sign_agreement(estimate, reference).astype(np.float64),
            "rel_err": relative_error(estimate, reference),
            "ratio": ratio(estimate, reference)}


def summarise(estimate: Any, reference: Any) -> dict[str, float]:
    """Summary over steps: cosine, pearson, spearman, sign_agreement (fraction),
    median_rel_err, median_ratio (over steps with d ≠ 0), norm_ratio ‖h‖/‖d‖, n_steps."""
    h, d = paired_arrays(estimate, reference)
    r = ratio(h, d)
    nd = np.linalg.norm(d)
    return {
        "cosine": cosine_similarity(h, d),
        "pearson": pearson(h, d),
        "spearman": spearman(h, d),
        "sign_agreement": float(sign_agreement(h, d).mean()),
        "median_rel_err": float(np.median(relative_error(h, d))),
        "median_ratio": float(np.median(r[np.isfinite(r)])) if np.isfinite(r).any() else math.nan,
        "norm_ratio": float(np.linalg.norm(h) / nd) if nd > 0 else math.nan,
        "n_steps": int(h.size),
    }


def _align(estimates: np.ndarray, T: int, alignment: str) -> np.ndarray:
    """Return a (T,) array whose entry t estimates the derivative w.r.t. η_t (NaN = none)."""
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if estimates.shape != (T,):
        raise ValueError(f"estimates has shape {estimates.shape} but lrs has {T} steps; "
                         f"estimates must have shape ({T},) (one per step, alignment={alignment!r})")
    if alignment == "after_step":
        used = estimates
    else:
        used = estimates[1:]
    if not np.isfinite(used).all():
        bad = np.flatnonzero(~np.isfinite(estimates))
        bad = bad[bad > 0] if alignment == "before_step" else bad
        raise ValueError(f"estimates contains NaN or inf at steps {bad[:10].tolist()}")
    if alignment == "after_step":
        return estimates.copy()
    out = np.full(T, np.nan)
    out[:-1] = estimates[1:]
    return out


# ----------------------------------------------------------------------------- report

_ARRAYS = ("lrs", "estimates", "one_step", "constant_lr", "full_horizon", "val_losses",
           "train_losses")


@dataclass
class ApproximationReport:
    r"""An online estimate against the exact references along the same trajectory.

    Arrays (numpy, shape (T,), index t ↔ η_t — see the module's alignment convention):
    ``lrs`` η_t; ``estimates`` the aligned estimate of ∂/∂η_t (NaN where there is none);
    ``one_step`` d⁽¹⁾_t; ``constant_lr`` d⁽ᶜ⁾_t; ``full_horizon`` g_t; ``val_losses`` E(w_{t+1});
    ``train_losses`` L_t(w_t). ``per_step[ref]`` holds ``sign_agree``, ``rel_err``, ``ratio``
    against reference ``ref`` ∈ ``REFERENCES`` (NaN where there is no estimate).
    ``summary[ref]`` is :func:`summarise` of the estimate against ``ref``;
    ``summary["horizons"][ref]`` compares the exact one-step and constant-LR references with g
    (the part of the error due to the horizon alone); ``summary["lr_update"]`` compares the
    online updates Δη_t = η_{t+1} − η_t with −g_t. ``info``: problem, optimizer, alignment,
    label, T, final value E(w_T).
    """

    lrs: np.ndarray
    estimates: np.ndarray
    one_step: np.ndarray
    constant_lr: np.ndarray
    full_horizon: np.ndarray
    val_losses: np.ndarray
    train_losses: np.ndarray
    per_step: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def references(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in REFERENCES}

    @property
    def label(self) -> str:
        return str(self.info.get("label") or "online estimate")

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """:func:`hgtoolkit.save`: ``<path>.json`` (info, summary and arrays, readable; non-finite
        numbers as null) and ``<path>.npz`` (the arrays, exact), with their checksums. Returns the
        JSON path, as every record's ``save``."""
        return records.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ApproximationReport":
        """:func:`hgtoolkit.records.load` of an ``approximation`` record."""
        return records.load(path, kind="approximation")

    @staticmethod
    def _migrate_v1(cls, d: dict) -> dict:
        """The fields of a file written before the codec (format ``hgtoolkit.ApproximationReport/1``):
        arrays from the npz (``per_step.<ref>.<name>``) when it was there, else from the JSON."""
        if all(isinstance(d.get(k), np.ndarray) for k in _ARRAYS):
            arrays = {k: d[k] for k in _ARRAYS}
            per_step: dict = {}
            for key, arr in d.items():
                if key.startswith("per_step."):
                    _, ref, name = key.split(".", 2)
                    per_step.setdefault(ref, {})[name] = arr
        else:
            nan = lambda v: np.array([np.nan if x is None else x for x in v], dtype=np.float64)
            arrays = {k: nan(v) for k, v in d["arrays"].items()}
            per_step = {r: {n: nan(v) for n, v in m.items()} for r, m in d["per_step"].items()}
        return dict(**arrays, per_step=per_step, summary=d["summary"], info=d["info"])

    # -- presentation ----------------------------------------------------------------
    def table(self, digits: int = 3) -> str:
        """The summary as a Markdown table (one row per reference) plus the horizon and
        LR-update comparisons."""
        fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (
            f"{v:.{digits}g}" if isinstance(v, float) else str(v))
        cols = [("cosine", "cosine"), ("pearson", "Pearson"), ("spearman", "Spearman"),
                ("sign_agreement", "sign agree"), ("median_rel_err", "median rel. err"),
                ("median_ratio", "median h/d"), ("norm_ratio", "‖h‖/‖d‖")]
        head = "| " + " | ".join(["reference"] + [c for _, c in cols]) + " |"
        rule = "|" + "---|" * (len(cols) + 1)
        lines = [f"**{self.label}** on {self.info.get('problem', {}).get('name', '?')} "
                 f"({self.info.get('optimizer', {}).get('name', '?')}, T = {self.info.get('T')}, "
                 f"E(w_T) = {fmt(self.info.get('value'))}), alignment `{self.info.get('alignment')}`",
                 "", head, rule]
        for ref in REFERENCES:
            s = self.summary[ref]
            lines.append("| " + " | ".join([f"estimate vs {REFERENCE_LABELS[ref]}"]
                                           + [fmt(s[k]) for k, _ in cols]) + " |")
        for ref in ("one_step", "constant_lr"):
            s = self.summary["horizons"][ref]
            lines.append("| " + " | ".join([f"exact {REFERENCE_LABELS[ref].split(' (')[0]} vs g"]
                                           + [fmt(s[k]) for k, _ in cols]) + " |")
        u = self.summary["lr_update"]
        lines += ["", f"Online LR updates Δη_t = η_(t+1) − η_t vs LRS-OPT direction −g_t: "
                      f"cosine {fmt(u['cosine'])}, sign agreement {fmt(u['sign_agreement'])} "
                      f"(over the {u['n_moved']} of {u['n_steps']} steps where η changed)."]
        return "\n".join(lines)

    def __repr__(self) -> str:
        s = self.summary.get("full_horizon", {})
        return (f"ApproximationReport(label={self.label!r}, T={len(self.lrs)}, "
                f"cos_vs_full_horizon={s.get('cosine', math.nan):.4g}, "
                f"sign_agree_vs_full_horizon={s.get('sign_agreement', math.nan):.4g})")


records.register(
    "approximation", version=2, readable=(*_ARRAYS, "per_step"), nan=("summary",),
    legacy_formats=("hgtoolkit.ApproximationReport/1",), migrations={1: ApproximationReport._migrate_v1},
    redo="rerun it: `python -m hgtoolkit analyse ...` or `analysis.analyse_online(...).save(path)`",
)(ApproximationReport)


def _build_report(refs: ExactReferences, estimates: np.ndarray, info: dict) -> ApproximationReport:
    np_refs = {k: v.detach().cpu().to(torch.float64).numpy() for k, v in refs.as_dict().items()}
    mask = np.isfinite(estimates)
    per_step, summary = {}, {}
    for ref, d in np_refs.items():
        metrics = {k: np.full(len(estimates), np.nan) for k in ("sign_agree", "rel_err", "ratio")}
        for k, v in compare(estimates[mask], d[mask]).items():
            metrics[k][mask] = v
        per_step[ref] = metrics
        summary[ref] = summarise(estimates[mask], d[mask])
    g = np_refs["full_horizon"]
    summary["horizons"] = {ref: summarise(np_refs[ref], g) for ref in ("one_step", "constant_lr")}
    lrs = refs.lrs.detach().cpu().to(torch.float64).numpy()
    if len(lrs) >= 2:
        upd = np.diff(lrs)
        moved = upd != 0
        agree = sign_agreement(upd, -g[:-1])[moved]
        summary["lr_update"] = {"cosine": cosine_similarity(upd, -g[:-1]),
                                "sign_agreement": float(agree.mean()) if agree.size else math.nan,
                                "n_steps": int(upd.size), "n_moved": int(moved.sum())}
    else:
        summary["lr_update"] = {"cosine": math.nan, "sign_agreement": math.nan, "n_steps": 0,
                                "n_moved": 0}
    to_np = lambda v: v.detach().cpu().to(torch.float64).numpy()
    info = {**info, "T": len(lrs), "value": float(refs.value), "optimizer": refs.optimizer}
    return ApproximationReport(lrs=lrs, estimates=estimates, **np_refs,
                               val_losses=to_np(refs.val_losses), train_losses=to_np(refs.train_losses),
                               per_step=per_step, summary=summary, info=info)


def analyse(problem, lrs: Any, estimates: Any, optimizer: "str | _dynamics.Dynamics" = "sgd", *,
            alignment: str = "after_step", label: str | None = None, info: dict | None = None,
            memory: "int | str | None" = None, progress: bool = False) -> ApproximationReport:
    r"""Compare ``estimates`` (an online method's h) with d⁽¹⁾, d⁽ᶜ⁾ and g along ``lrs``.

    ``lrs`` (T,) is the schedule actually used (η_t at step t); ``estimates`` (T,) follows
    ``alignment`` (module docstring): by default ``estimates[t]`` = h_{t+1}, the estimate
    formed after step t. ``info`` (e.g. the online method's configuration) is copied into the
    report. Costs one forward pass of the online engine (one HVP per step) and one reverse pass.

    >>> import hgtoolkit, torch
    >>> from hgtoolkit.analysis import analyse, exact_references
    >>> p = hgtoolkit.problems.from_function("beale")
    >>> lrs = torch.full((30,), 1e-3, dtype=torch.float64)
    >>> hd_like = exact_references(p, lrs).one_step          # what HD (μ = 0) would estimate
    >>> round(analyse(p, lrs, hd_like).summary["one_step"]["cosine"], 12)
    1.0
    """
    lrs = check_lrs(lrs, problem)
    est = _as_vector(estimates, "estimates", allow_nonfinite=True)
    est = _align(est, len(lrs), alignment)
    refs = exact_references(problem, lrs, optimizer, memory=memory,
                            progress=progress)
    meta = {"label": label, "alignment": alignment, "problem": problem.describe(), **(info or {})}
    return _build_report(refs, est, meta)


def _online_label(config: dict) -> str:
    method = str(config.get("method", "online"))
    bits = [method.upper()]
    if method == "marthe":
        bits.append(f"μ={config.get('mu')}")
    beta = config.get("hypergrad_lr", config.get("beta"))  # (records written before 0.2: "beta")
    bits.append(f"β={beta:g}" if isinstance(beta, (int, float)) else f"β={beta}")
    bits.append(f"objective={config.get('objective', 'val')}")
    return " ".join(bits)


def _online_inputs(result: Any, problem):
    """(problem as the run saw it, optimizer, lrs, estimates, n = steps with a finite estimate)."""
    from .online import OnlineResult  # the record this function reads
    if not isinstance(result, OnlineResult):
        raise TypeError(f"result must be an hgtoolkit.online.OnlineResult, got {type(result).__name__}")
    config = result.config
    recorded = config.get("problem", {}).get("name")
    if recorded is not None and recorded != problem.name:
        raise ValueError(f"problem is {problem.name!r} but the online run was on {recorded!r}")
    seed = config.get("seed")
    if seed is not None and problem.resample is not None:
        problem = problem.resample(seed)
    optimizer = _dynamics.from_config(config["optimizer"])
    lrs = np.asarray(result.lrs, dtype=np.float64)
    h = np.asarray(result.hypergrads, dtype=np.float64)
    usable = np.isfinite(h) & np.isfinite(lrs)
    n = len(lrs) if usable.all() else int(np.argmin(usable))
    if n == 0:
        raise ValueError(f"result has no step with a finite estimate to analyse "
                         f"(diverged_at={result.diverged_at})")
    return problem, optimizer, lrs, h, n


def analyse_online(result: Any, problem, *, label: str | None = None, check_trajectory: bool = True,
                   memory: "int | str | None" = None, progress: bool = False) -> ApproximationReport:
    r"""Compare an :class:`hgtoolkit.online.OnlineResult` with the exact references.

    ``result.hypergrads[t]`` is h_{t+1} (the estimate formed after step t), so the alignment is
    ``"after_step"``; the schedule is ``result.lrs`` and the optimizer ``result.config["optimizer"]``.
    ``problem`` must be the problem the run was given (for a run with ``seed``, it is resampled
    the same way). A run that diverged is analysed up to its last step with a finite estimate.
    With ``check_trajectory`` the replayed minibatch losses L_t(w_t) must match the run's
    (ValueError otherwise: wrong problem, or a run not replayable from its record).

    For HD (μ ≡ 0) with objective "val", h equals d⁽¹⁾; for RTHO (μ ≡ 1), h equals d⁽ᶜ⁾ — for
    any β, because both recursions are evaluated along the run's own schedule. What the report
    measures for them is the horizon error (their reference against g); MARTHE's μ ∈ (0, 1)
    and HD's training-loss objective add their own.
    """
    problem, optimizer, lrs, h, n = _online_inputs(result, problem)
    config = result.config
    info = {"online": {k: v for k, v in config.items() if k != "problem"},
            "steps_analysed": n, "steps_run": len(lrs), "diverged_at": result.diverged_at}
    report = analyse(problem, lrs[:n], h[:n], optimizer, alignment="after_step",
                     label=label or _online_label(config), info=info,
                     memory=memory, progress=progress)
    if check_trajectory:
        ran = np.asarray(result.train_losses[:n], dtype=np.float64)
        tol = 1e-8 if problem.dtype == torch.float64 else 1e-4
        gap = np.abs(report.train_losses - ran)
        bad = np.flatnonzero(gap > tol * (1.0 + np.abs(ran)))
        if bad.size:
            t = int(bad[0])
            raise ValueError(f"the replayed trajectory differs from the online run's from step {t} "
                             f"(L_t = {report.train_losses[t]:.10g} vs {ran[t]:.10g} recorded): is "
                             f"problem the one the run used ({config.get('problem')})?")
    return report


# ----------------------------------------------------------------------------- horizon ladder

def horizon_ladder(problem, lrs: Any, estimates: Any, Ks: Any = (1, 10, 100, None),
                   optimizer: "str | _dynamics.Dynamics" = "sgd", *, alignment: str = "after_step") -> dict:
    r"""Which horizon does an estimate see? Its agreement with the truncated-horizon references
    d⁽ᴷ⁾_t = ∂E(w_{min(t+K, T)})/∂η_t (:func:`hgtoolkit.horizons.truncated_ladder`, one forward
    pass for the whole ladder) for every K in ``Ks`` (None = T, the full horizon).

    Returns ``{"Ks": [...], "rows": {K: {"cosine", "sign_agreement", "median_rel_err"}},
    "best": K with the highest cosine}`` (steps without an estimate are left out).
    """
    from .horizons import truncated_ladder
    lrs = check_lrs(lrs, problem)
    T = len(lrs)
    est = _align(_as_vector(estimates, "estimates", allow_nonfinite=True), T, alignment)
    Ks = [T if k is None else k for k in Ks]
    refs = truncated_ladder(problem, lrs, sorted(set(Ks)), optimizer)
    keep = np.isfinite(est)
    rows = {}
    for k in Ks:
        s = summarise(est[keep], refs[k].detach().cpu().numpy()[keep])
        rows[k] = {m: s[m] for m in ("cosine", "sign_agreement", "median_rel_err")}
    finite = [k for k in Ks if math.isfinite(rows[k]["cosine"])]
    best = max(finite, key=lambda k: rows[k]["cosine"]) if finite else None
    return {"Ks": Ks, "rows": rows, "best": best, "T": T}


def horizon_ladder_online(result: Any, problem, Ks: Any = (1, 10, 100, None)) -> dict:
    """:func:`horizon_ladder` of an :class:`hgtoolkit.online.OnlineResult` (``hypergrads`` are
    "after_step"; a diverged run is analysed up to its last finite estimate)."""
    problem, optimizer, lrs, h, n = _online_inputs(result, problem)
    out = horizon_ladder(problem, lrs[:n], h[:n], Ks, optimizer)
    out["method"] = _online_label(result.config)
    return out


# ----------------------------------------------------------------------------- plotting

plot_approximation = moved("hgtoolkit.analysis.plot_approximation", "hgtoolkit.plotting.plot_approximation")
