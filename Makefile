# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (idempotently).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lab bench docs clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	# torch pinned: the CPU wheel lies on disk; a looser pin would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hgtoolkit reproduce demo

# two workers (pytest-xdist), whole test files per worker: the suite in about 2-3 minutes on 2 cores
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lab: $(STAMP)
	$(PY) -m pip install --quiet -e ".[notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

# the documentation site in docs/_build/html: notebooks executed (myst-nb cache: only changed ones
# re-run; HGTOOLKIT_NOTEBOOK_SMALL=1 for their tiny settings), warnings are errors
DOCS_STAMP := $(VENV)/.docs-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	rm -f $(VENV)/.docs-* && touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) docs/generate.py
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html
	@echo "open docs/_build/html/index.html"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
