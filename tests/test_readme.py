"""The README's Python snippets run as written, and the README stays a guide.

Each ```python block of README.md is executed in order, each in a fresh namespace, in a temporary
working directory (a snippet that saves a figure writes it there). The tour is sized to run in
seconds; a snippet that fails fails here with its block number.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_is_a_guide():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md over 250 lines: move detail into docs/"
    first_code = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_code[:2]] == ["make demo", "make test"], \
        "the README's first commands are `make demo` and `make test`"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("make test"), "CI runs the README's command"
    for target in re.findall(r"\]\(((?:docs|notebooks|benchmarks)/[^)#]+)\)", text):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
    assert len(BLOCKS) >= 4, "the tour has at least four snippets"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. the MNIST fallback data's warning
        exec(code, {"__name__": f"readme_block_{index + 1}"})
