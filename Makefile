# Two commands: `make demo` and `make test`. Both create or reuse .venv and install the
# pinned, tested set from constraints.txt (idempotent: a stamp file records what was installed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo induction test test-slow test-tl4 notebooks bench lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/explaind-tl grokking

# the second study: induction heads in a 2-layer attention-only model (5-7 min on 2 cores)
induction: $(STAMP)
	$(VENV)/bin/explaind-tl induction

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# TransformerLens 4 (TransformerBridge, no HookedTransformer) in its own environment: the unit
# tests, the bridge tests (record, replay, explain a bridge model), both studies and the
# faithfulness command on a bridge (the default backend there); the rest of the suite builds
# HookedTransformers (3.x)
VENV4  := .venv-tl4
STAMP4 := $(VENV4)/.installed-stamp

$(STAMP4): pyproject.toml constraints-tl4.txt
	test -x $(VENV4)/bin/python || $(PYTHON) -m venv $(VENV4)
	$(VENV4)/bin/python -m pip install --quiet --upgrade pip
	$(VENV4)/bin/python -m pip install --quiet -c constraints-tl4.txt torch==2.13.0
	$(VENV4)/bin/python -m pip install --quiet -c constraints-tl4.txt -e ".[dev]"
	touch $(STAMP4)

test-tl4: $(STAMP4)
	$(VENV4)/bin/python -m pytest -q tests/unit tests/integration/test_bridge.py tests/integration/test_induction_study.py \
		tests/integration/test_grokking.py tests/integration/test_faithfulness.py

# rebuild examples/*.ipynb from examples/_make_notebooks.py and execute them (outputs committed)
notebooks: $(STAMP)
	$(PY) examples/_make_notebooks.py

lint: $(STAMP)
	$(VENV)/bin/ruff check explaind_tl analyses tests

clean:
	rm -rf $(VENV) $(VENV4) runs .pytest_cache
