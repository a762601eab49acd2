"""hgtoolkit.settings is the one declaration of the run settings: the command line's flags, the
sweep cell kinds' keys and the functions' keywords must list the same settings with the same
defaults, and the functions must reject what the declaration rejects, naming the setting."""
from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import MISSING

import numpy as np
import pytest
import torch

from hgtoolkit import exact, lrsopt, marthe, online, problems, settings
from hgtoolkit import batched
from hgtoolkit.cli import build_parser
from hgtoolkit.settings import HypergradSettings, LrsoptSettings, OnlineSettings, TrainSettings
from hgtoolkit.sweep import CELL_KINDS

# what the functions take besides the settings: the problem, callables, tensors and run control
NOT_SETTINGS = {
    online.run: {"problem", "mu_rule", "progress", "raise_on_divergence", "keep_params"},
    lrsopt.optimize_schedule: {"problem", "lrs", "checkpoint_path", "resume", "progress",
                               "callback", "objective"},
    exact.hypergradient: {"problem", "lrs", "progress", "disk"},
}
SCHEMA = {online.run: OnlineSettings, lrsopt.optimize_schedule: LrsoptSettings,
          exact.hypergradient: settings.ExactSettings}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flags(command: str) -> dict[str, argparse.Action]:
    return {opt: a for a in _subparser(command)._actions for opt in a.option_strings}


def test_online_takes_the_settings_and_their_defaults():
    """online.run, its validator and a batch's cells are derived from OnlineSettings: what they
    accept, what they require and the defaults they fill in."""
    beale = problems.get("beale")
    for call in (lambda **kw: online.run(beale, **kw),
                 lambda **kw: batched.run_online_batch(None, [{"problem": beale, **kw}])):
        with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'.*OnlineSettings"):
            call(lr=0.01, steps=2, hypergrad_lr=0.0, momentum=0.9)
        with pytest.raises(TypeError, match="missing required keyword argument 'lr'"):
            call(steps=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        online.hyper_config("hd", lr=0.1, hypergrad_lr=0.0, momentum=0.9)
    r = online.run(beale, "marthe", lr=0.01, steps=2)  # every default from the declaration
    for name in ("hypergrad_lr_rule", "lr_floor", "divergence_factor", "objective", "method"):
        assert r.config[name] == settings.defaults(OnlineSettings)[name], name
    assert r.config["hypergrad_lr"] == "auto" and r.config["kappa"] == settings.defaults(OnlineSettings)["kappa"]


def test_a_setting_the_method_does_not_use_is_refused_when_passed_even_at_its_default():
    """kappa, hypergrad_lr_init/_rule/_bound are MARTHE's adaptive β's (Spec.methods and
    Spec.needs): passed with hd/rtho or a numeric β they raise, naming the setting and what does
    not use it — at their defaults too (what the caller passed counts, not how it compares with
    the default); not passed they are silent, and MARTHE's adaptive β takes them.
    RunSettings.kwargs passes on what the settings were given."""
    adaptive = {k: d for k, (d, s) in settings.specs(OnlineSettings).items() if s.needs}
    assert set(adaptive) == {"kappa", "hypergrad_lr_init", "hypergrad_lr_rule", "hypergrad_lr_bound"}
    given = dict(kappa=1e-3, hypergrad_lr_init=1e-4, hypergrad_lr_rule="h_eta", hypergrad_lr_bound=None)
    assert online.hyper_config("marthe", lr=1e-3, **given).kappa == 1e-3  # β "auto": all used
    assert online.hyper_config("marthe", lr=1e-3, **adaptive).kappa == adaptive["kappa"]
    for method, beta, what in (("hd", 1e-7, "method='hd'"), ("rtho", 1e-7, "method='rtho'"),
                               ("marthe", 1e-7, "hypergrad_lr=1e-07")):
        online.hyper_config(method, lr=1e-3, hypergrad_lr=beta)  # not passed: silent
        for name in given:
            for value in (given[name], adaptive[name]):  # off its default, and at it
                with pytest.raises(ValueError, match=rf"^{name}=.* applies to method='marthe' with "
                                                     rf"hypergrad_lr='auto'; {what} does not use it"):
                    online.hyper_config(method, lr=1e-3, hypergrad_lr=beta, **{name: value})
    s = OnlineSettings(method="hd", lr=1e-3, steps=2, hypergrad_lr=1e-7)
    assert s.kwargs() == {"method": "hd", "lr": 1e-3, "steps": 2, "hypergrad_lr": 1e-7}
    assert s.all_settings()["kappa"] == adaptive["kappa"]
    assert online.run(problems.get("beale"), **s.kwargs()).config["method"] == "hd"
    with pytest.raises(ValueError, match="kappa=1e-06 applies to"):
        online.run(problems.get("beale"), **OnlineSettings(method="hd", lr=1e-3, steps=2, hypergrad_lr=1e-7,
                                                           kappa=1e-6).kwargs())
    assert settings.unused(OnlineSettings, {"method": "hd", "hypergrad_lr": 1e-7, "kappa": 1e-6}) == ["kappa"]
    assert settings.unused(OnlineSettings, {"method": "hd", "hypergrad_lr": 1e-7, "kappa": 1e-3}, given=()) == []


@pytest.mark.parametrize("function", list(SCHEMA), ids=lambda f: f.__name__)
def test_function_keywords_are_the_settings_with_the_same_defaults(function):
    params = inspect.signature(function).parameters
    table = settings.specs(SCHEMA[function])
    assert set(params) == set(table) | NOT_SETTINGS[function]
    for name, (default, _) in table.items():
        expected = inspect.Parameter.empty if default is MISSING else default
        assert params[name].default == expected, name


def test_other_declarations_agree_with_the_settings():
    spec = lambda schema, name: settings.specs(schema)[name][1]
    assert spec(OnlineSettings, "method").choices == online.METHODS
    assert spec(OnlineSettings, "objective").choices == online.OBJECTIVES
    assert spec(OnlineSettings, "hypergrad_lr_rule").choices == tuple(marthe.BETA_RULES)
    assert spec(LrsoptSettings, "outer_optimizer").choices == lrsopt.OUTER_OPTIMIZERS
    assert spec(LrsoptSettings, "mode").choices == spec(HypergradSettings, "mode").choices == exact.MODES
    hg = inspect.signature(exact.hypergradient).parameters
    for name, (default, _) in settings.specs(HypergradSettings).items():
        if name in hg:
            assert hg[name].default == default, name


def test_sweep_kinds_take_the_settings():
    assert set(CELL_KINDS["online"].params) == set(settings.specs(OnlineSettings))
    assert set(CELL_KINDS["lrsopt"].params) == set(settings.specs(LrsoptSettings)) | {"lr", "steps"}
    assert set(CELL_KINDS["train"].params) == set(settings.specs(TrainSettings))
    assert set(CELL_KINDS["hypergrad"].params) == set(settings.specs(HypergradSettings))


@pytest.mark.parametrize("command, schema, names, cli_defaults", [
    ("online", OnlineSettings, None, {}),
    ("lrsopt", LrsoptSettings, None, {}),
    ("lrsopt", TrainSettings, ["lr", "steps", "optimizer"], {}),
    ("hypergrad", HypergradSettings, ["lr", "steps", "optimizer", "mode", "checkpoint", "snapshots", "memory", "chunk_size"], {}),
    ("analyse", OnlineSettings, ["mu", "kappa", "objective", "lr", "optimizer", "seed"], {}),
    ("towers", settings.TowerSettings, None, {}),
])
def test_cli_flags_are_the_settings_with_the_same_defaults(command, schema, names, cli_defaults):
    flags = _flags(command)
    table = settings.specs(schema)
    for name in names or [k for k, (_, s) in table.items() if s.cli]:
        default, spec = table[name]
        flag = "--" + name.replace("_", "-")
        assert flag in flags, flag
        expected = spec.cli_default if default is MISSING else default
        assert flags[flag].default == cli_defaults.get(name, expected), flag


def _outside(spec: settings.Spec) -> list:
    """Values the declaration rejects: just outside the range, a word, an unknown choice."""
    if spec.kind in ("choice", "optimizer"):
        return ["no_such_choice"]
    if spec.kind in ("flag", "mapping", "text"):  # text: any string (disk: a directory's name)
        return []
    bad = ["a_word"]
    if spec.lo is not None:
        bad.append(spec.lo if spec.open_lo else spec.lo - 1)
    if spec.hi is not None:
        bad.append(spec.hi + 1)
    return bad


def _cases(schema):
    return [(name, value) for name, (_, spec) in settings.specs(schema).items() for value in _outside(spec)]


@pytest.mark.parametrize("name, value", _cases(OnlineSettings))
def test_online_rejects_what_the_settings_reject(name, value):
    base = {"lr": 0.01, "steps": 3}
    with pytest.raises(ValueError, match=name):
        OnlineSettings(**{**base, name: value})
    with pytest.raises((ValueError, TypeError), match=name):
        online.run(problems.get("beale"), **{**base, name: value})


@pytest.mark.parametrize("name, value", _cases(LrsoptSettings))
def test_lrsopt_rejects_what_the_settings_reject(name, value):
    base = {"outer_steps": 1, "progress": False}
    with pytest.raises(ValueError, match=name):
        LrsoptSettings(**{"outer_steps": 1, name: value})
    with pytest.raises((ValueError, TypeError), match=name):
        lrsopt.optimize_schedule(problems.get("beale"), torch.full((2,), 1e-3), **{**base, name: value})


def test_settings_normalise_and_give_keywords():
    s = OnlineSettings(lr=0, steps=5, hypergrad_lr="auto", optimizer="SGD")
    assert s.lr == 0.0 and isinstance(s.lr, float) and s.optimizer == "sgd"
    assert online.run(problems.get("beale"), **s.kwargs()).config["hypergrad_lr"] == "auto"
    with pytest.raises(TypeError):
        OnlineSettings(steps=5)  # lr is required, as in online.run
    assert OnlineSettings(lr=0.1, steps=1, lr_floor=None).lr_floor is None


def test_spec_parse_is_the_command_line_face_of_check():
    spec = settings.specs(OnlineSettings)["mu"][1]
    assert spec.parse("auto") == "auto" and spec.parse("0.5") == 0.5 and spec.parse("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\]"):
        spec.parse("1.5")
    steps = settings.specs(OnlineSettings)["steps"][1]
    assert steps.parse("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        steps.parse("0")
    assert math.isclose(settings.specs(OnlineSettings)["kappa"][1].parse("1e-3"), 1e-3)


def test_towers_take_the_tower_settings():
    from hgtoolkit import towers
    beale = problems.get("beale")
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr'.*TowerSettings"):
        towers.run(beale, "sgd(lr=1e-4) / sgd(lr=1e-9)", 2, lr=0.1)
    params = inspect.signature(towers.run).parameters
    assert params["divergence_factor"].default == settings.defaults(settings.TowerSettings)["divergence_factor"]
    with pytest.raises(ValueError, match="divergence_factor"):
        towers.run(beale, "sgd(lr=1e-4) / sgd(lr=1e-9)", 2, divergence_factor=0.5)


def test_old_names_raise_naming_the_new_ones(capsys):
    """The 0.2 vocabulary (docs/glossary.md): an old keyword, flag or record key is never taken
    silently; calls and flags say the new name, old records load under the new keys."""
    from hgtoolkit import baselines, hdm, records, towers
    beale = problems.get("beale")
    renamed_lr = "'lr0' was renamed 'lr'"
    with pytest.raises(TypeError, match=renamed_lr):
        online.run(beale, "hd", lr0=1e-3, hypergrad_lr=0.0, steps=2)
    with pytest.raises(TypeError, match=renamed_lr):
        online.hyper_config("hd", lr0=1e-3, hypergrad_lr=0.0)
    with pytest.raises(TypeError, match=renamed_lr):
        batched.run_online_batch(None, [{"problem": beale, "lr0": 1e-3, "steps": 2, "hypergrad_lr": 0.0}])
    with pytest.raises(TypeError, match=renamed_lr):
        baselines.exponential_decay(lr0=0.1, gamma=0.9, T=3)
    with pytest.raises(TypeError, match="'lrs0' was renamed 'lrs'"):
        lrsopt.optimize_schedule(beale, lrs0=torch.full((2,), 1e-3), outer_steps=1)
    with pytest.raises(TypeError, match="'beta0' was renamed 'momentum_init'"):
        hdm.HDMConfig(L=1.0, beta0=0.9)
    assert hdm.HDMConfig(L=1.0, momentum_init=0.9).momentum_init == 0.9
    r = towers.run(beale, "sgd(lr=1e-4) / sgd(lr=1e-9)", 2)
    assert r.diverged is False
    with pytest.raises(AttributeError, match=r"renamed \.diverged"):
        r.blew_up
    with pytest.raises(SystemExit):
        build_parser().parse_args(["online", "--lr0", "1e-3"])
    assert "--lr0 was renamed --lr" in capsys.readouterr().err
    # a record of the previous version: its config's lr0 reads back as lr
    run = online.run(beale, "hd", lr=1e-3, hypergrad_lr=0.0, steps=2)
    d = records.to_dict(run)
    d["version"], d["config"] = 2, {("lr0" if k == "lr" else k): v for k, v in d["config"].items()}
    old = records.from_dict(d, "online")
    assert old.config["lr"] == 1e-3 and "lr0" not in old.config



def test_beta_is_hypergrad_lr_with_a_future_warning_for_one_release(capsys):
    """``beta`` (and ``beta0``, ``beta_rule``, ``beta_bound``) became ``hypergrad_lr`` (…): the
    Python keyword is still taken until 0.2, forwarded with a FutureWarning naming the new one
    (errors.DEPRECATED); both names at once are a TypeError; the flag is a usage error; records
    written with the old names load under the new ones."""
    from hgtoolkit import errors, optim, records
    beale = problems.get("beale")
    new = online.run(beale, "marthe", lr=1e-3, hypergrad_lr="auto", hypergrad_lr_init=1e-7, steps=3)
    with pytest.warns(FutureWarning) as seen:
        old = online.run(beale, "marthe", lr=1e-3, beta="auto", beta0=1e-7, steps=3)
    assert sorted(str(w.message) for w in seen) == [
        "run(): 'beta' is now 'hypergrad_lr' (docs/glossary.md); 'beta' will raise in 0.2",
        "run(): 'beta0' is now 'hypergrad_lr_init' (docs/glossary.md); 'beta0' will raise in 0.2"]
    assert all(w.filename == __file__ for w in seen)  # the warning points at the caller's line
    np.testing.assert_array_equal(old.lrs, new.lrs)
    assert old.config == new.config and old.config["hypergrad_lr_init"] == 1e-7
    for call in (lambda **kw: online.run(beale, "hd", lr=1e-3, steps=2, **kw),
                 lambda **kw: online.hyper_config("hd", lr=1e-3, **kw),
                 lambda **kw: batched.run_online_batch(None, [{"problem": beale, "lr": 1e-3, "steps": 2, **kw}]),
                 lambda **kw: online.find_hypergrad_lr(beale, start=1e-9, method="hd", lr=1e-3, steps=2, **kw),
                 lambda **kw: optim.MARTHE([torch.zeros(2, requires_grad=True)], method="hd", **kw)):
        with pytest.warns(FutureWarning, match="'beta' is now 'hypergrad_lr'"):
            call(beta=1e-9)
        with pytest.raises(TypeError, match="got both 'beta' and 'hypergrad_lr'"):
            call(beta=1e-9, hypergrad_lr=1e-9)
    with pytest.warns(FutureWarning, match="'beta_rule' is now 'hypergrad_lr_rule'"):
        assert online.hyper_config(lr=1e-3, beta_rule="h_eta").beta_rule == "h_eta"
    with pytest.warns(FutureWarning, match="Explorer.update\\(\\): 'beta' is now"):
        assert errors.check_renamed("Explorer.update", {"beta": 1.0}, takes=("hypergrad_lr",)) == {"hypergrad_lr": 1.0}
    with pytest.raises(AttributeError, match="find_beta moved to hgtoolkit.online.find_hypergrad_lr"):
        online.find_beta(beale)
    # the command line: the old flags are errors naming the new ones
    for argv, flag in ((["online", "--beta", "1e-7"], "--beta was renamed --hypergrad-lr"),
                       (["online", "--beta-bound", "2"], "--beta-bound was renamed --hypergrad-lr-bound"),
                       (["online", "--find-beta"], "--find-beta was renamed --find-hypergrad-lr"),
                       (["analyse", "--beta", "1e-7"], "--beta was renamed --hypergrad-lr")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert flag in capsys.readouterr().err
    # a record of the previous version (3): config keys beta…, fields betas, beta_capped
    d = records.to_dict(new)
    old_keys = {v: k for k, v in errors.DEPRECATED.items()}
    d["version"], d["config"] = 3, {old_keys.get(k, k): v for k, v in d["config"].items()}
    d["betas"], d["beta_capped"] = d.pop("hypergrad_lrs"), d.pop("hypergrad_lr_capped")
    back = records.from_dict(d, "online")
    assert back.config == new.config and back.hypergrad_lr_capped == new.hypergrad_lr_capped
    np.testing.assert_array_equal(back.hypergrad_lrs, new.hypergrad_lrs)


def test_lrsopt_and_exact_check_each_setting_by_its_declaration():
    """optimize_schedule and hypergradient bind their settings through LrsoptSettings /
    ExactSettings: a bad value's message is its declaration's (a wrong type is a TypeError too)."""
    import re
    beale = problems.get("beale")
    lrs = torch.full((3,), 1e-3, dtype=torch.float64)
    run = lambda **kw: lrsopt.optimize_schedule(beale, lrs, **{"outer_steps": 1, "outer_lr": 1e-4,
                                                               "progress": False, **kw})
    cases = [(run, LrsoptSettings, dict(outer_steps=0, outer_lr=-1.0, outer_optimizer="newton", mode="sideways",
                                        max_backtracks=-1, snapshot_every=0, checkpoint_interval=0, seed=-1,
                                        lr_max=0.0, checkpoint=0, outer_options=[1])),
             (lambda **kw: exact.hypergradient(beale, lrs, **kw), settings.ExactSettings,
              dict(mode="sideways", checkpoint=0, snapshots=0, chunk_size=0, memory="lots"))]
    for call, schema, bad in cases:
        for name, value in bad.items():
            what = f"{name} must be {settings.specs(schema)[name][1].describe('None')}, got {value!r}"
            with pytest.raises(ValueError, match=re.escape(what)):
                call(**{name: value})
    for call in (lambda: run(outer_steps=True), lambda: run(resample_batches=1),
                 lambda: exact.hypergradient(beale, lrs, chunk_size=2.0)):
        with pytest.raises(TypeError, match="must be"):
            call()
    with pytest.raises(TypeError, match="outer_lr is required for outer_optimizer='sgd'"):
        run(outer_optimizer="sgd", outer_lr=None)
    assert run(outer_optimizer="ADAM").config["outer_optimizer"] == "adam"


def test_the_marthe_dropin_takes_the_dropin_settings_with_their_defaults():
    """optim.MARTHE's group options are OnlineSettings' ``dropin`` settings: its signature,
    its param groups' keys and defaults, and the setup cache's keys (OnlineOptimizer._options)."""
    from hgtoolkit import optim
    table = settings.specs(OnlineSettings, only=settings.dropin_option)
    params = inspect.signature(optim.MARTHE).parameters
    assert {k: params[k].default for k in table} == {k: d for k, (d, _) in table.items()}
    assert set(params) - set(table) == {"params", "lr", "mu_rule", "objective", "optimizer",
                                        "raise_on_divergence", "module"}
    opt = optim.MARTHE([torch.zeros(2, requires_grad=True)], lr=0.1, hypergrad_lr=1e-3)
    group = opt.param_groups[0]
    assert all(group[k] == (1e-3 if k == "hypergrad_lr" else d) for k, (d, _) in table.items())
    assert set(table) <= set(opt._options) and "lr" not in opt._options
    with pytest.raises(TypeError, match="MARTHE\\(\\) got an unexpected keyword argument 'steps'"):
        optim.MARTHE([torch.zeros(2, requires_grad=True)], steps=3)


def test_the_plotting_functions_named_after_beta_say_their_new_names():
    from hgtoolkit import plotting
    for old, new in (("plot_best_vs_beta", "plot_best_vs_hypergrad_lr"), ("plot_mean_vs_beta", "plot_mean_vs_hypergrad_lr")):
        with pytest.raises(AttributeError, match=f"{old} moved to hgtoolkit.plotting.{new}"):
            getattr(plotting, old)([1e-3], {})
        assert callable(getattr(plotting, new))
