"""Every case of the reliability table (tests/reliability_cases.py, docs/reliability.md) gets what
its row says: the API raises (or warns) the type named with a message matching the row's pattern
(it names the argument, the file or the quantity); the CLI exits with status 2 and one line on
stderr matching it, writing nothing. And the committed page's table is the one the cases generate."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest

from hgtoolkit.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
import reliability_cases as rc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT_COMMANDS = ("hypergrad", "lrsopt", "online", "analyse", "towers")  # these take --out: nothing may appear there


def run_cli(argv, capsys):
    """(exit status, stderr) of the CLI run in-process (argparse's errors exit through SystemExit)."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", rc.CASES, ids=[c.id for c in rc.CASES])
def test_case(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case.surface == "CLI":
        monkeypatch.syspath_prepend(str(tmp_path))  # a user's problem module written there (module:function)
        argv = case.call(tmp_path) if callable(case.call) else list(case.call)
        out = tmp_path / "out"
        if argv[0] in OUT_COMMANDS:
            argv = argv + ["--out", str(out)]
        capsys.readouterr()
        code, err = run_cli(argv, capsys)
        assert code == case.expect, err
        assert len(err.strip().splitlines()) == 1, err
        assert re.search(case.match, err), err
        assert not out.exists()  # nothing written
        return
    if issubclass(case.expect, Warning):
        with pytest.warns(case.expect, match=case.match):
            case.call(tmp_path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(case.expect, match=case.match):
                case.call(tmp_path)


def test_rows_are_distinct_classes_of_input():
    ids = [c.id for c in rc.CASES]
    assert len(set(ids)) == len(ids), "two cases share an id"
    classes = [(c.entry, c.klass) for c in rc.CASES]
    assert len(set(classes)) == len(classes), "two cases share an entry point and a class of input"
    assert all(c.surface in ("API", "CLI") and c.match for c in rc.CASES)
    assert len(rc.CASES) >= 150


def test_the_page_is_the_table_of_the_cases():
    """docs/reliability.md's table is what docs/generate.py writes from the cases (make docs)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = generate.reliability_table(rc.CASES)
    assert generate.reliability_page(text, table) == text, "run python docs/generate.py"
    for c in rc.CASES:
        assert f"| `{c.id}` |" in text
