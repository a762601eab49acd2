r"""Short-horizon bias (Wu, Ren, Liao, Grosse, ICLR 2018) and the horizon each online rule sees.

1. Noisy quadratic model, exactly (:mod:`hgtoolkit.horizons`): ``d`` curvatures spanning
   ``kappa`` (3 decades: h ∈ [1e-3, 1]), gradient-noise variance c_i = h_i (Wu et al.'s
   σ_i² = 1/h_i), w_0 = ``w0``, T steps of SGD with momentum. Final expected loss E L(w_T) of
   the greedy schedule (Thm 2, η_t and μ_t), the best fixed (η, μ) (L-BFGS-B on 2 numbers) and
   the horizon-T optimal schedules (LRS-OPT with L-BFGS-B on the exact loss and its adjoint
   gradient, from the fixed pair and from the greedy schedule, the better kept; caps
   0 ≤ η_t ≤ 2/max h, 0 ≤ μ_t ≤ 0.9995), next to Wu et al.'s 63.86 / 42.19 / 4.25; then the
   same with σ = 0 (c = 0) and no caps, where greedy (= conjugate gradient) is optimal with
   momentum (checked: relative difference ≤ 1e-6) and not without. ``quick`` uses d = 100,
   T = 100 (same spectrum range); ``full`` Wu et al.'s d = 1000, T = 250.
2. Horizon ladder on the MNIST MLP: HD, RTHO and MARTHE (adaptive μ) runs; each run's
   estimates h_{t+1} against d⁽ᴷ⁾_t = ∂E(w_{min(t+K,T)})/∂η_t for K in ``Ks`` (and T) along the
   run's own schedule (:func:`hgtoolkit.analysis.horizon_ladder_online`): which K each matches.

Writes ``data/nqm.json`` (schedules and loss curves), ``data/ladder.json``, figures
``nqm_schedules`` and ``horizon_ladder``, and ``summary.md``/``summary.json``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import analysis, horizons, online, plotting, problems, records
from . import common

__all__ = ["Config", "run", "PAPER"]

#: Wu et al. (2018), Sec. 4 (their spectrum; ours is a stand-in): final E L(w_T) at T = 250.
PAPER = {"greedy": 63.86, "fixed": 42.19, "optimal": 4.25}


@dataclass(frozen=True)
class Config:
    seed: int = 0
    d: int = 1000
    kappa: float = 1000.0
    spectrum: str = "chebyshev"
    w0: float = 1.0
    T: int = 250
    outer_steps: int = 300
    mnist_T: int = 100
    n_train: int = 1000
    n_val: int = 200
    hidden: tuple = (50, 50)
    lr: float = 0.05
    hypergrad_lrs: tuple = (("hd", 1e-3), ("rtho", 1e-5), ("marthe", 1e-4))
    Ks: tuple = (1, 10)
    threads: int = 1

    @classmethod
    def full(cls) -> "Config":
        """Wu et al.'s scale on the NQM (d = 1000, T = 250); MNIST ladder T = 200 with K = 1, 10, 30."""
        return cls(outer_steps=150, mnist_T=200, n_train=2000, n_val=500, Ks=(1, 10, 30))

    @classmethod
    def quick(cls) -> "Config":
        """d = 100 curvatures (same 3-decade spectrum), T = 50 (< d: with σ = 0 conjugate gradient
        must not terminate exactly, or both losses are round-off): seconds on the NQM."""
        return cls(d=100, T=50, outer_steps=100)

    @classmethod
    def tiny(cls) -> "Config":
        return cls(d=20, T=10, outer_steps=8, mnist_T=8, n_train=100, n_val=50, hidden=(8,), Ks=(1, 3))


def _fixed_pair(nqm, T, momentum, lr_max, mu_max):
    """Best constant (η, μ) by L-BFGS-B on the exact loss (2 numbers, 3 starts; the chain rule
    sums the schedule gradient of :func:`horizons.nqm_value_and_grad`)."""
    from scipy.optimize import minimize

    def fun(x):
        v, g_eta, g_mu = horizons.nqm_value_and_grad(nqm, torch.full((T,), x[0], dtype=nqm.dtype),
                                                      torch.full((T,), x[1], dtype=nqm.dtype) if momentum else None)
        return float(v), np.array([float(g_eta.sum()), float(g_mu.sum()) if momentum else 0.0])

    hmax = float(nqm.h.max())
    best = None
    for x0 in ([0.1 / hmax, 0.5], [0.5 / hmax, 0.9], [0.02 / hmax, 0.99]):
        r = minimize(fun, np.array(x0), jac=True, method="L-BFGS-B",
                     bounds=[(0.0, lr_max), (0.0, mu_max if momentum else 0.0)])
        if best is None or r.fun < best.fun:
            best = r
    return float(best.x[0]), float(best.x[1]), float(best.fun)


def _stationarity(nqm, lrs, mus) -> float:
    """max_t |x_t ∂f/∂x_t| / f over the schedule entries x (η and μ): the scale-free size of the
    gradient of f = E L(w_T); 0 at a stationary point."""
    v, g_eta, g_mu = horizons.nqm_value_and_grad(nqm, lrs, mus)
    s = (lrs * g_eta).abs().max() if g_mu is None else torch.maximum((lrs * g_eta).abs().max(), (mus * g_mu).abs().max())
    return float(s / v)


def _nqm_case(config: Config, noisy: bool, momentum: bool) -> dict:
    from testfunctions import NoisyQuadratic
    h = horizons.nqm_spectrum(config.d, config.kappa, config.spectrum)
    nqm = NoisyQuadratic(h, h if noisy else torch.zeros_like(h), config.w0)
    T = config.T
    # noisy: Wu et al.-style caps (plain SGD stable, μ < 1); σ = 0: none (CG's schedule breaks them)
    lr_max, mu_max = (2.0 / float(h.max()), 0.9995) if noisy else (None, math.inf)
    greedy = horizons.greedy_schedule(nqm, T, momentum=momentum)
    eta_c, mu_c, fixed = _fixed_pair(nqm, T, momentum, lr_max, mu_max)
    x0_eta = torch.full((T,), eta_c, dtype=h.dtype)
    g_eta, g_mu = greedy.lrs, greedy.momentum
    if noisy:
        g_eta, g_mu = g_eta.clamp(max=lr_max), None if g_mu is None else g_mu.clamp(0.0, mu_max)
    starts = {"fixed": (x0_eta, mu_c), "greedy": (g_eta, 0.0 if g_mu is None else g_mu)}
    runs = {k: horizons.optimal_schedule(nqm, T, momentum, lrs=e0, momentum0=m0, lr_max=lr_max,
                                         momentum_max=mu_max, outer_steps=config.outer_steps,
                                         outer_options={"ftol": 0.0, "gtol": 0.0})
            for k, (e0, m0) in starts.items()}  # LRS-OPT from both starts; keep the better
    opt = min(runs.values(), key=lambda r: r.best_value)
    best = torch.as_tensor(opt.best_lrs)
    lrs_opt, mus_opt = (best[:T], best[T:]) if momentum else (best, None)
    curve = lambda lr, mu: [float(m.expected_loss(h)) for m in horizons.nqm_moments(nqm, lr, mu, history=True)]
    hi = h >= float(h.median())  # high- vs low-curvature half of the loss at T
    split = lambda lr, mu: [float(0.5 * (h * (m.mean_w ** 2 + m.var_w))[sel].sum())
                            for m in [horizons.nqm_moments(nqm, lr, mu)] for sel in (hi, ~hi)]
    g_final = float(greedy.losses[-1])
    return {"noisy": noisy, "momentum": momentum, "initial": float(greedy.losses[0]),
            "greedy": g_final, "fixed": fixed, "optimal": float(opt.best_value),
            "optimal_from": {k: float(r.best_value) for k, r in runs.items()},
            "greedy_vs_optimal_rel": abs(g_final - float(opt.best_value)) / float(opt.best_value),
            "greedy_stationarity": _stationarity(nqm, greedy.lrs, greedy.momentum),
            "caps": {"lr_max": lr_max, "momentum_max": mu_max if momentum else None},
            "fixed_lr": eta_c, "fixed_momentum": mu_c, "lrsopt_status": opt.status,
            "lrsopt_evaluations": sum(r.n_evaluations for r in runs.values()),
            "schedules": {"greedy": {"lr": greedy.lrs.numpy(), "momentum": None if greedy.momentum is None else greedy.momentum.numpy()},
                          "optimal": {"lr": lrs_opt.numpy(), "momentum": None if mus_opt is None else mus_opt.numpy()}},
            "curves": {"greedy": greedy.losses.numpy(), "fixed": curve(x0_eta, torch.full((T,), mu_c, dtype=h.dtype) if momentum else None),
                       "optimal": curve(lrs_opt, mus_opt)},
            "high_low_curvature_loss": {"greedy": split(greedy.lrs, greedy.momentum), "optimal": split(lrs_opt, mus_opt)}}


def _ladder(config: Config, progress: bool) -> list[dict]:
    p = problems.mnist_mlp(n_train=config.n_train, n_val=config.n_val, hidden=config.hidden, seed=config.seed,
                           dtype=torch.float64)
    out = []
    for method, beta in config.hypergrad_lrs:
        kw = {"mu": "auto"} if method == "marthe" else {}
        r = online.run(p, method, lr=config.lr, steps=config.mnist_T, hypergrad_lr=beta, progress=progress, **kw)
        lad = analysis.horizon_ladder_online(r, p, Ks=tuple(config.Ks) + (None,))
        out.append({"method": method, "hypergrad_lr": beta, "best": lad["best"], "Ks": lad["Ks"], "rows": lad["rows"],
                    "final_lr": r.final_lr, "final_val_loss": r.final_val_loss, "diverged_at": r.diverged_at})
    return out


def run(config: Config, out_dir, progress: bool = True) -> dict:
    with common.limited_threads(config.threads):  # small tensors: extra threads only add contention
        return _run(config, out_dir, progress)


def _run(config: Config, out_dir, progress: bool) -> dict:
    out = common.as_output_dir(out_dir)
    cases = {}
    for n in (True, False):
        for m in (True, False):
            key = f"{'noisy' if n else 'sigma0'}_{'momentum' if m else 'sgd'}"
            if progress:
                print(f"[horizons] NQM {key}")
            cases[key] = _nqm_case(config, n, m)
    records.atomic_write_json(out.data("nqm.json"), cases)
    ladder = _ladder(config, progress)
    records.atomic_write_json(out.data("ladder.json"), ladder)
    _figures(out, cases, ladder, config)
    rows = [[k, c["initial"], c["greedy"], c["fixed"], c["optimal"], c["optimal_from"]["fixed"],
             c["optimal_from"]["greedy"], c["greedy"] / c["optimal"], c["greedy_stationarity"]] for k, c in cases.items()]
    rows.append(["Wu et al. (noisy, momentum; their spectrum)", None, PAPER["greedy"], PAPER["fixed"], PAPER["optimal"],
                 None, None, PAPER["greedy"] / PAPER["optimal"], None])
    nqm_table = common.markdown_table(["case", "E L(w_0)", "greedy", "fixed", "optimal", "LRS-OPT from fixed",
                                       "LRS-OPT from greedy", "greedy/optimal", "greedy stationarity"], rows)
    lrows = [[f"{r['method']} (β={r['hypergrad_lr']:g})"] + [r["rows"][k]["cosine"] for k in r["Ks"]] + [r["best"]] for r in ladder]
    Ks = ladder[0]["Ks"] if ladder else []
    ladder_table = common.markdown_table(["run"] + [f"cos K={k}" for k in Ks] + ["best K"], lrows)
    hl = cases["noisy_momentum"]["high_low_curvature_loss"]
    s0 = cases["sigma0_momentum"]
    checks = {"sigma0_momentum_greedy_equals_optimal": bool(s0["greedy_vs_optimal_rel"] <= 1e-6),
              "sigma0_momentum_greedy_vs_optimal_rel": s0["greedy_vs_optimal_rel"],
              "sigma0_sgd_optimal_below_greedy": bool(cases["sigma0_sgd"]["optimal"] < cases["sigma0_sgd"]["greedy"]),
              "noisy_momentum_optimal_below_greedy": bool(cases["noisy_momentum"]["optimal"] < cases["noisy_momentum"]["greedy"])}
    notes = [f"Spectrum: {config.d} {config.spectrum} points on [1/{config.kappa:g}, 1] (a stand-in; Wu et al.'s "
             "Li (2005) formula is UNVERIFIED), c_i = h_i, w_0 = "
             f"{config.w0:g}, T = {config.T}: absolute numbers differ from the paper's, the ordering is the claim.",
             f"LRS-OPT: L-BFGS-B on the exact loss and gradient, ≤ {config.outer_steps} steps from the fixed pair and "
             "from the greedy schedule, the better kept. Caps: noisy 0 ≤ η_t ≤ 2/max h, 0 ≤ μ_t ≤ 0.9995; "
             "σ = 0 none (conjugate gradient's schedule exceeds both).",
             f"Noisy, momentum: loss at T in the high-/low-curvature halves — greedy {hl['greedy'][0]:.3g} / "
             f"{hl['greedy'][1]:.3g}, optimal {hl['optimal'][0]:.3g} / {hl['optimal'][1]:.3g}.",
             f"σ = 0 with momentum: greedy (= conjugate gradient) vs optimal, relative difference "
             f"{s0['greedy_vs_optimal_rel']:.2g} (≤ 1e-6: {checks['sigma0_momentum_greedy_equals_optimal']}); "
             "greedy stationarity = max_t |x_t ∂f/∂x_t| / f at the greedy schedule (0 = stationary). "
             "Without momentum greedy (steepest descent with exact line search) is not optimal.",
             "Ladder: cosine of each run's online estimates with d⁽ᴷ⁾ along its own schedule; the last K is T."]
    summary = {"nqm": {k: {kk: c[kk] for kk in ("initial", "greedy", "fixed", "optimal", "optimal_from",
                                                 "greedy_vs_optimal_rel", "greedy_stationarity", "caps", "fixed_lr",
                                                 "fixed_momentum", "lrsopt_status", "lrsopt_evaluations")}
                       for k, c in cases.items()},
               "checks": checks, "paper": PAPER,
               "ladder": [{k: r[k] for k in ("method", "hypergrad_lr", "best", "Ks", "rows", "final_val_loss")} for r in ladder]}
    return common.write_summary(out, "Horizons: short-horizon bias on the NQM, and the horizon of online rules",
                                [("Noisy quadratic model: final expected loss", nqm_table),
                                 ("Horizon ladder on MNIST (cosine with d⁽ᴷ⁾)", ladder_table)], summary, notes=notes)


def _figures(out, cases, ladder, config) -> None:
    fig, axes = plotting.figure(ncols=3, width=11 / 3, height=3.2)  # constrained layout: caption inside
    for name, c in (("noisy", cases["noisy_momentum"]), ("σ=0", cases["sigma0_momentum"])):
        ls = "-" if name == "noisy" else ":"
        for kind, color in (("greedy", "C0"), ("optimal", "C3")):
            s = c["schedules"][kind]
            axes[0].plot(s["lr"], ls, color=color, label=f"{kind} ({name})")
            axes[1].plot(s["momentum"], ls, color=color, label=f"{kind} ({name})")
        for kind, color in (("greedy", "C0"), ("fixed", "C2"), ("optimal", "C3")):
            axes[2].semilogy(c["curves"][kind], ls, color=color, label=f"{kind} ({name})")
    axes[0].set(title="learning rate η_t", xlabel="t")
    axes[1].set(title="momentum μ_t", xlabel="t")
    axes[2].set(title="E L(w_t)", xlabel="t")
    axes[2].legend(fontsize=6)
    plotting.savefig(fig, out.figure("nqm_schedules"), caption=f"NQM d={config.d}, T={config.T}", close=True)
    fig, ax = plotting.figure(width=5, height=3.2)
    for i, r in enumerate(ladder):
        ax.plot([str(k) for k in r["Ks"]], [r["rows"][k]["cosine"] for k in r["Ks"]], "o-", label=r["method"])
    ax.set(xlabel="horizon K", ylabel="cosine(h, d⁽ᴷ⁾)", title="which horizon each online rule sees")
    ax.legend()
    plotting.savefig(fig, out.figure("horizon_ladder"), caption="MNIST MLP", close=True)
