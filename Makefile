# The README's two commands: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-long soak chaos faults docs venv clean

demo: $(STAMP)
	$(BIN)/ringlib demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not long"

# The deeper variants the suite leaves out for its time (5-rank grids, 3 hosts of 2, ...):
# each has a shorter sibling in `make test`. Plain `pytest` runs both.
test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

# 10,000 random collectives on 3 ranks, every result checked (tests/test_soak.py runs 1,500).
soak: $(STAMP)
	$(BIN)/ringlib bench soak -n 3 --collectives 10000

# 20 trials of 4 ranks losing one to SIGKILL or SIGSTOP, then 20 that re-form
# (tests/test_chaos.py runs 4).
chaos: $(STAMP)
	$(BIN)/ringlib bench chaos
	$(BIN)/ringlib bench chaos --reform

# All-reduce on clean and faulty links between network namespaces (root; docs/benchmarks.md).
faults: $(STAMP)
	$(BIN)/ringlib bench netem

# The documentation in docs/ (mkdocs.yml), built into site/; --strict fails on any warning.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

venv: $(STAMP)

# Reinstall whenever the package metadata or the constraints change.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
