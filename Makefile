# Two commands: `make run` (main job on the embedded default data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the exact CPU wheel on local disk (pyproject.toml only asks torch>=2.4,<3, so a CUDA build stays)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stellarparams run --out runs/default

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
