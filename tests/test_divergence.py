"""One divergence module: the rule, the record (step, quantity, value), one warning and one error
type, reported the same way by every runner; a NaN validation loss is named as such."""
from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch

import hgtoolkit
from hgtoolkit import baselines, divergence, online, towers
from hgtoolkit.divergence import Divergence, DivergenceError, DivergenceWarning


def _problem(train_nan_at=None, val_nan=False):
    """w ∈ R³, L_t = |w|² (NaN at step ``train_nan_at``), E = |w|² (NaN with ``val_nan``)."""
    def train_loss(w, t):
        return (w ** 2).sum() * (math.nan if t == train_nan_at else 1.0)

    def val_loss(w):
        return (w ** 2).sum() * (math.nan if val_nan else 1.0)
    return hgtoolkit.Problem(torch.ones(3, dtype=torch.float64), train_loss, val_loss)


def test_the_record_names_step_quantity_value_and_reason():
    d = Divergence(4, "validation loss", 12.5, divergence.ABOVE_LIMIT)
    assert d.message == "training diverged at step 4: validation loss above divergence_factor × its initial value (12.5)"
    err = d.error(prefix="x: ", note=" (y)")
    assert isinstance(err, FloatingPointError) and str(err) == "x: " + d.message + " (y)"
    assert (err.step, err.quantity, err.value, err.reason) == (4, "validation loss", 12.5, d.reason)
    assert err.what == "validation loss"  # the older name of the field
    back = pickle.loads(pickle.dumps(err))  # a sweep's worker processes send it back
    assert back.divergence == err.divergence and str(back) == str(err)
    assert divergence.from_code(3, 3, 2.0, "val").quantity == "validation loss"
    assert divergence.from_code(3, 3, 2.0, "train").quantity == "training loss"
    assert divergence.from_code(3, 5, 1e9).quantity == "learning rate"


def test_one_loss_rule_for_floats_and_tensors():
    for ref, factor in ((2.0, 2.0), (-3.0, 2.0), (0.0, 2.0), (1.5, 3.0)):
        as_float = divergence.loss_limit(ref, factor)
        as_tensor = divergence.loss_limit(torch.tensor(ref, dtype=torch.float64), factor)
        assert as_float == float(as_tensor)
    assert divergence.loss_limit(2.0, None) == math.inf
    assert divergence.check_loss(5, 4.5, 2.0, 2.0) == Divergence(5, "training loss", 4.5, divergence.ABOVE_LIMIT)
    assert divergence.check_loss(5, 3.9, 2.0, 2.0) is None
    assert divergence.check_loss(1, math.nan, 2.0, None).reason == "is not finite"


def test_a_nan_validation_loss_is_reported_as_the_validation_loss():
    with pytest.raises(DivergenceError, match="validation loss is not finite") as exc:
        hgtoolkit.train(_problem(val_nan=True), torch.full((4,), 0.1, dtype=torch.float64))
    assert exc.value.quantity == "validation loss" and exc.value.step == 3
    with pytest.raises(DivergenceError, match="validation loss") as exc:
        hgtoolkit.hypergradient(_problem(val_nan=True), torch.full((4,), 0.1, dtype=torch.float64))
    assert exc.value.quantity == "validation loss"
    with pytest.warns(DivergenceWarning, match="validation loss is not finite") as seen:
        r = online.run(_problem(val_nan=True), "hd", lr=0.1, hypergrad_lr=1e-3, steps=5)
    assert "validation loss" in r.divergence and r.diverged_at == 0
    assert seen[0].message.divergence.quantity == "validation loss"


def test_every_runner_warns_with_the_record():
    def caught(fn):
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            fn()
        return [w.message for w in ws if isinstance(w.message, DivergenceWarning)]

    for fn in (lambda: online.run(_problem(train_nan_at=3), "hd", lr=0.1, hypergrad_lr=1e-3, steps=10),
               lambda: towers.run(_problem(train_nan_at=3), "sgd(lr=0.1) / sgd(lr=1e-3)", 10),
               lambda: baselines.run_peer(_problem(train_nan_at=3), "constant", 10, lr=0.1)):
        (w,) = caught(fn)
        assert w.divergence.step == 3 and w.divergence.quantity == "training loss"
        assert w.divergence.reason == "is not finite" and "step 3" in str(w)


def test_recorded_collects_divergence_and_passes_other_warnings_on():
    with pytest.warns(UserWarning, match="other"):
        with divergence.recorded() as seen:
            r = online.run(_problem(train_nan_at=2), "hd", lr=0.1, hypergrad_lr=1e-3, steps=10)
            warnings.warn("other", UserWarning)
    assert [d.step for d in seen] == [r.diverged_at] == [2]
    assert seen[0].quantity == "training loss"
