"""A problem of the user's, ``module:function``, wherever a problem is named: problems.get, every
command line that takes --problem, and sweep grids."""
from __future__ import annotations

import sys
import textwrap

import pytest

from hgtoolkit import problems, sweep
from hgtoolkit.cli import main

MODULE = "hg_user_problem_for_tests"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent('''
        import torch
        from hgtoolkit import problems

        def bowl(scale=1.0, dtype=torch.float64, seed=0):
            """E(w) = scale·(‖w‖² + w_0) from w_0 = (1, 2) + seed."""
            return problems.from_function(lambda w: scale * ((w ** 2).sum() + w[0]),
                                          [1.0 + seed, 2.0], dtype=dtype, name="bowl")

        def not_a_problem():
            return 3

        VALUE = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield MODULE
    sys.modules.pop(MODULE, None)


def test_get_builds_a_user_problem(user_module):
    p = problems.get(f"{user_module}:bowl", scale=2.0, dtype="float32")
    assert isinstance(p, problems.Problem) and p.name == "bowl" and p.dtype.is_floating_point
    assert float(p.val_loss(p.params0)) == pytest.approx(2.0 * (1 + 4 + 1))
    assert set(problems.parameters(f"{user_module}:bowl")) == {"scale", "dtype", "seed"}


@pytest.mark.parametrize("name, error, message", [
    ("hg_no_such_module_here:bowl", ValueError, "cannot import module 'hg_no_such_module_here'"),
    (f"{MODULE}:missing", ValueError, "has no 'missing'"),
    (f"{MODULE}:not_a_problem", ValueError, "returned a int, not a hgtoolkit.problems.Problem"),
    (f"{MODULE}:VALUE", ValueError, "not a function"),
    (f"{MODULE}:", ValueError, "module:function"),
])
def test_bad_user_problems_say_what_is_wrong(user_module, name, error, message):
    with pytest.raises(error, match=message):
        problems.get(name)


def test_unknown_keyword_of_a_user_problem_is_named(user_module):
    with pytest.raises(TypeError, match="no argument 'width'"):
        problems.get(f"{user_module}:bowl", width=3)


@pytest.mark.parametrize("argv", [
    ["hypergrad", "--problem-arg", "scale=0.5"], ["lrsopt", "--problem-arg", "scale=0.5"],
    ["online", "--method", "hd", "--hypergrad-lr", "1e-3", "--problem-arg", "scale=0.5"],
    ["analyse", "--problem-arg", "scale=0.5"], ["towers", "--seed", "1"]], ids=lambda a: a[0])
def test_every_problem_command_builds_a_user_problem(user_module, tmp_path, monkeypatch, capsys, argv):
    """Each command builds its problem with cli.args.make_problem (stopped right after it)."""
    from hgtoolkit.cli import args as cli_args
    built = []

    def make_problem(*a, **kw):
        built.append(real(*a, **kw))
        raise ValueError("stop here")

    real = cli_args.make_problem
    monkeypatch.setattr(cli_args, "make_problem", make_problem)
    assert main([*argv, "--problem", f"{user_module}:bowl", "--out", str(tmp_path)]) == 2
    assert "stop here" in capsys.readouterr().err
    assert len(built) == 1 and built[0].name == "bowl"
    assert float(built[0].params0[0]) == (2.0 if argv[0] == "towers" else 1.0)  # towers passes --seed


def test_cli_names_a_bad_user_problem_on_one_line(user_module, tmp_path, capsys):
    assert main(["online", "--problem", f"{user_module}:not_a_problem", "--method", "hd", "--hypergrad-lr", "1e-3",
                 "--steps", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not_a_problem" in err[0] and "Problem" in err[0]


def test_sweep_grid_runs_a_user_problem(user_module, tmp_path):
    grid = sweep.Grid("user", {"name": f"{user_module}:bowl", "scale": 0.5}, "train",
                      axes={"seed": [0, 1]}, fixed={"lr": 0.1, "steps": 3})
    sweep.run(grid, tmp_path / "store", progress=False)
    records = sweep.load_results(tmp_path / "store")
    assert len(records) == 2 and records[0]["result"]["value"] != records[1]["result"]["value"]  # seed reaches bowl


@pytest.mark.parametrize("section, message", [
    ({"name": f"{MODULE}:bowl", "width": 3}, "unknown argument"),
    ({"name": f"{MODULE}:missing"}, "problem.name"),
    ({"name": "hg_no_such_module_here:bowl"}, "cannot import"),
])
def test_sweep_grid_rejects_a_bad_user_problem_up_front(user_module, section, message):
    with pytest.raises(ValueError, match=message):
        sweep.Grid("bad", section, "train", fixed={"lr": 0.1, "steps": 3})
