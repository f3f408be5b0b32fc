# Two commands for a fresh machine:  `make demo` (main job) and `make test` (the test suite, as CI runs it).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed first, so nothing pulls a CUDA build onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install protos clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/accordion demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

protos: $(VENV)/.installed
	$(PY) -m accordion.protos.build

clean:
	rm -rf $(VENV) build *.egg-info
