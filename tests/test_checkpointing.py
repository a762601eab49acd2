"""Checkpointing schedules of reverse mode: bit-identical to storing every step, the binomial
count of recomputed steps, and the memory budget that chooses a schedule or refuses one."""
import dataclasses

import checkpoint_schedules as cs
import pytest
import torch

from hgtoolkit import checkpointing, hypergradient, lrsopt, problems
from hgtoolkit.checkpointing import Footprint, MemoryBudgetError, binomial_recomputations


def _schedule(T, base, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return base * (0.5 + torch.rand(T, generator=gen, dtype=torch.float64))


def _forward_steps(plan):
    return sum(a.n1 - a.n0 for a in plan.actions() if isinstance(a, cs.Forward))


# ----------------------------------------------------------------------------- the binomial count

@pytest.mark.parametrize("T, c, expected", [(10, 1, 45), (10, 2, 20), (10, 3, 15), (10, 9, 9),
                                            (100, 3, 490), (1, 1, 0)])
def test_binomial_count_by_hand(T, c, expected):
    # c = 1: only s_0 kept, step t replayed t times: T(T−1)/2; c ≥ T−1: one extra pass, T − 1
    assert binomial_recomputations(T, c) == expected


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33, 100])
def test_the_schedule_run_recomputes_what_the_binomial_formula_says(T):
    fp = Footprint(state=10, graph=30)
    for c in range(1, min(T, 9) + 1):
        plan = checkpointing.binomial_plan(T, c, fp)
        assert _forward_steps(plan) - T == binomial_recomputations(T, c) == plan.recomputed, (T, c)


def test_every_k_and_stored_schedules_count_their_steps():
    fp = Footprint(state=10, graph=30)
    for T, k in ((17, 4), (16, 4), (5, 1), (9, 20)):
        plan = checkpointing.every_plan(T, k, fp)
        assert _forward_steps(plan) - T == plan.recomputed == (T - 1) // min(k, T) * min(k, T)
    assert _forward_steps(checkpointing.stored_plan(12, fp)) == 12


# ----------------------------------------------------------------------------- bit-identical

@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_binomial_equals_stored_bit_for_bit(opt):
    problem = problems.synthetic_classification()
    T = 23
    lrs = _schedule(T, 0.05)
    stored = hypergradient(problem, lrs, opt, checkpoint=None)
    assert stored.schedule == "stored" and stored.recomputed_steps == 0
    for c in (1, 2, 3, 5, 23):
        r = hypergradient(problem, lrs, opt, checkpoint="binomial", snapshots=c)
        assert torch.equal(r.grad, stored.grad), c
        assert torch.equal(r.value, stored.value) and torch.equal(r.train_losses, stored.train_losses)
        assert r.schedule == "binomial" and r.recomputed_steps == binomial_recomputations(T, c)
        assert 1 <= r.snapshots <= c


def test_binomial_equals_stored_at_T_500():
    problem = problems.from_function("beale")
    lrs = _schedule(500, 1e-3)
    stored = hypergradient(problem, lrs, "momentum", checkpoint=None)
    r = hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=6)
    assert torch.equal(r.grad, stored.grad)
    assert r.recomputed_steps == binomial_recomputations(500, 6)


# ----------------------------------------------------------------------------- the disk tier

def _ram_for(result, c):
    """A budget that holds c binomial snapshots in memory and not c + 1 (``result``: a binomial
    run that reports its estimate and snapshots)."""
    fixed = result.memory_estimate - result.snapshots * _state_bytes(result)
    return int(checkpointing.ALLOCATOR_SLACK * (fixed + (c + 0.5) * _state_bytes(result)))


def _state_bytes(result):
    return sum(x.numel() * x.element_size() for x in result.params.values()) * 2  # w and b


def test_disk_snapshots_are_bit_identical_to_stored_and_removed_afterwards(tmp_path):
    problem = problems.synthetic_classification()
    T = 60
    lrs = _schedule(T, 0.05)
    stored = hypergradient(problem, lrs, "momentum", checkpoint=None)
    ram = hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=6)
    assert ram.disk_snapshots is None  # no disk tier asked for
    budget = _ram_for(ram, 2)
    r = hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=6, memory=budget, disk=tmp_path)
    assert torch.equal(r.grad, stored.grad) and torch.equal(r.value, stored.value)
    assert r.snapshots <= 2 and r.disk_snapshots >= 1 and r.snapshots + r.disk_snapshots <= 6
    assert r.recomputed_steps == binomial_recomputations(T, 6) == ram.recomputed_steps  # same schedule
    assert list(tmp_path.iterdir()) == []  # the run's snapshot files are gone
    auto = hypergradient(problem, lrs, "momentum", memory=budget, disk=True)  # chosen by the budget
    assert torch.equal(auto.grad, stored.grad)
    assert auto.schedule == "binomial" and auto.snapshots <= 2
    assert auto.snapshots + auto.disk_snapshots <= checkpointing.disk_target(T)
    fits = hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=6, disk=True)
    assert fits.disk_snapshots == 0  # memory was not short: nothing went to disk


def test_a_damaged_disk_snapshot_is_an_error_not_a_wrong_hypergradient(monkeypatch):
    from hgtoolkit.records import CorruptedFileError
    problem = problems.synthetic_classification()
    lrs = _schedule(20, 0.05)
    ram = hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=4)
    put = checkpointing.DiskSnapshots.put

    def damaging_put(self, n, state):  # one bit flipped in the middle of every file written
        put(self, n, state)
        path = self.files[n][0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    monkeypatch.setattr(checkpointing.DiskSnapshots, "put", damaging_put)
    with pytest.raises(CorruptedFileError, match="disk snapshot"):
        hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=4, memory=_ram_for(ram, 0),
                      disk=True)


def test_disk_target_is_the_fewest_snapshots_that_replay_each_step_at_most_twice():
    import math
    for T in (2, 10, 60, 1000, 10 ** 4):
        c = checkpointing.disk_target(T)
        assert math.comb(c + 2, 2) >= T and (c == 1 or math.comb(c + 1, 2) < T)
        assert binomial_recomputations(T, c) <= 2 * T
    assert checkpointing.disk_target(10 ** 4) == 140


def test_the_disk_tier_is_checked_and_refused_when_the_disk_is_short():
    problem = problems.synthetic_classification()
    lrs = _schedule(10, 0.05)
    with pytest.raises(ValueError, match="disk"):
        hypergradient(problem, lrs, checkpoint=4, disk=True)
    with pytest.raises(ValueError, match="disk"):
        hypergradient(problem, lrs, "momentum", mode="reversible", disk=True)
    with pytest.raises(TypeError, match="disk"):
        hypergradient(problem, lrs, disk=3)
    fp = Footprint(state=1000, graph=3000)
    short = checkpointing.DiskBudget(None, "/somewhere", free=2500)
    with pytest.raises(MemoryBudgetError, match="disk snapshots need"):
        checkpointing.plan(100, fp, "binomial", 5, 15625, short)  # 1 snapshot in memory, 4 kB to disk
    p = checkpointing.plan(100, fp, "auto", None, 15625, short)  # automatic: as many as the disk holds
    assert p.kind == "binomial" and p.disk == 2 and p.snapshots == 1


def test_the_automatic_disk_tier_weighs_disk_transfers_against_recomputation():
    T, fp = 200, Footprint(state=1000, graph=3000)
    limit = int(checkpointing.ALLOCATOR_SLACK * (fp.step + fp.work + 3.5 * fp.state))  # 3 snapshots in memory
    target = checkpointing.disk_target(T)

    def chosen(io):
        return checkpointing.plan(T, fp, "auto", None, limit, checkpointing.DiskBudget(None, "x", 10 ** 9, lambda: io))

    free = chosen(0.0)  # transfers cost nothing: the most snapshots, the least recomputation
    assert (free.snapshots, free.disk) == (3, target - 3)
    cheap, dear = chosen(0.5), chosen(1e4)
    assert dear.disk < cheap.disk <= free.disk and dear.snapshots == 3

    def predicted(p, io):
        return p.recomputed + io * sum(checkpointing.disk_traffic(p))
    for io, p in ((0.5, cheap), (1e4, dear)):  # no worse than the target or no disk at all
        assert predicted(p, io) <= min(predicted(free, io), predicted(checkpointing.binomial_plan(T, 3, fp), io))
    writes, reads = checkpointing.disk_traffic(free)
    assert writes >= free.disk and reads >= free.disk  # each disk snapshot written and read at least once


# ----------------------------------------------------------------------------- the budget

def test_parse_memory():
    assert checkpointing.parse_memory("200MB") == 200 * 10 ** 6
    assert checkpointing.parse_memory("1.5 GiB") == int(1.5 * 2 ** 30)
    assert checkpointing.parse_memory(2e9) == 2 * 10 ** 9 and checkpointing.parse_memory("auto") == "auto"
    for bad in ("lots", "-1MB", 0, "1XB"):
        with pytest.raises(ValueError, match="memory"):
            checkpointing.parse_memory(bad)
    with pytest.raises(TypeError, match="memory"):
        checkpointing.parse_memory(True)


def test_available_memory_includes_the_cgroup_limit(tmp_path):
    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("400000000\n")
    free = checkpointing.available_memory("cpu", cgroup=tmp_path)
    assert free <= 600_000_000
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable alone
    assert checkpointing.available_memory("cpu", cgroup=tmp_path) >= free


def test_the_budget_chooses_the_fastest_schedule_that_fits():
    fp = Footprint(state=100, graph=300)
    T = 100
    stored = checkpointing.stored_plan(T, fp)
    assert checkpointing.choose(T, fp, None).kind == "stored"
    assert checkpointing.choose(T, fp, stored.estimate).kind == "stored"
    mid = checkpointing.choose(T, fp, stored.estimate // 4)
    assert mid.kind == "every" and mid.estimate <= stored.estimate // 4
    # every k that fits recomputes fewer steps than any binomial schedule (≥ T − 1)
    assert mid.recomputed < T - 1
    small = 20 * fp.state + fp.step + fp.work
    low = checkpointing.choose(T, fp, small)
    assert low.kind == "binomial" and low.snapshots == 20 and low.estimate <= small
    with pytest.raises(MemoryBudgetError, match="Options"):
        checkpointing.choose(T, fp, fp.step)


def test_a_request_that_cannot_fit_is_refused_before_the_work():
    calls = []
    base = problems.synthetic_classification()

    def loss(w, t):
        calls.append(t)
        return base.train_loss(w, t)

    problem = dataclasses.replace(base, train_loss=loss)
    lrs = _schedule(40, 0.05)
    for kw in ({"memory": "1kB"}, {"memory": 1000, "checkpoint": None},
               {"memory": "1kB", "checkpoint": "binomial", "snapshots": 3}):
        calls.clear()
        with pytest.raises(MemoryBudgetError, match="state") as info:
            hypergradient(problem, lrs, "momentum", **kw)
        assert set(calls) <= {0}, kw  # step 0 only: the memory probe and the purity probe (check_pure)
        assert "checkpoint=" in str(info.value) or "snapshots" in str(info.value)
    r = hypergradient(problem, lrs, "momentum", memory="100MB")
    assert r.memory_budget == 100 * 10 ** 6 and r.memory_estimate <= r.memory_budget
    assert r.peak_memory is not None and r.peak_memory >= 0


def test_checkpoint_arguments_are_checked():
    problem = problems.from_function("beale")
    lrs = _schedule(8, 1e-3)
    with pytest.raises(TypeError, match="checkpoint="):
        hypergradient(problem, lrs, checkpoint_every=2)
    with pytest.raises(TypeError, match="checkpoint="):
        lrsopt.optimize_schedule(problem, lrs, 1, 1e-4, progress=False, checkpoint_every=2)
    for mode in ("forward", "autograd", "reversible"):
        with pytest.raises(ValueError, match="checkpoint"):
            hypergradient(problem, lrs, "momentum", mode=mode, checkpoint=2)
    with pytest.raises(ValueError, match="memory"):
        hypergradient(problem, lrs, mode="forward", memory="1GB")
    with pytest.raises(ValueError, match="snapshots"):
        hypergradient(problem, lrs, checkpoint=2, snapshots=3)
    with pytest.raises(TypeError, match="checkpoint"):
        hypergradient(problem, lrs, checkpoint="sqrt")
    with pytest.raises(ValueError, match="snapshots"):
        hypergradient(problem, lrs, checkpoint="binomial", snapshots=0)


def test_lrsopt_takes_a_memory_budget():
    problem = problems.synthetic_classification()
    lrs = _schedule(12, 0.05)
    a = lrsopt.optimize_schedule(problem, lrs, 2, 0.01, progress=False)
    b = lrsopt.optimize_schedule(problem, lrs, 2, 0.01, progress=False, memory="200MB",
                                 checkpoint="binomial", snapshots=2)
    assert torch.equal(torch.as_tensor(a.final_lrs), torch.as_tensor(b.final_lrs))


def test_command_line_takes_the_schedule_and_the_budget(tmp_path):
    import json
    from hgtoolkit.cli import main
    out = tmp_path / "hg"
    assert main(["hypergrad", "--problem", "beale", "--steps", "30", "--lr", "1e-3", "--optimizer", "momentum",
                 "--checkpoint", "binomial", "--snapshots", "3", "--memory", "200MB", "--disk", "tmp",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "hypergrad.json").read_text())
    assert rec["memory"]["schedule"] == "binomial" and rec["memory"]["recomputed_steps"] == binomial_recomputations(30, 3)
    assert rec["memory"]["disk_snapshots"] == 0  # the disk tier was there, and not needed
    assert rec["memory"]["memory_budget"] == 200 * 10 ** 6
    lo = tmp_path / "lo"
    assert main(["lrsopt", "--problem", "beale", "--steps", "20", "--lr", "1e-3", "--outer-lr", "3e-4",
                 "--outer-steps", "1", "--memory", "1GB", "--no-progress", "--out", str(lo)]) == 0
    with pytest.raises(SystemExit):
        main(["hypergrad", "--problem", "beale", "--memory", "lots", "--out", str(out)])
