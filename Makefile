# The README's two commands: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

demo: $(STAMP)
	$(BIN)/ringlib demo

test: $(STAMP)
	$(BIN)/python -m pytest

venv: $(STAMP)

# Reinstall whenever the package metadata or the constraints change.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
