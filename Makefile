# Two commands: `make run` (main job on the embedded default data) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-portable venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the exact CPU wheel on local disk (pyproject.toml only asks torch>=2.4,<3, so a CUDA build stays)
	$(PY) -m pip install -q torch==2.13.0
	# what `make run` needs (the simulate and plots extras) and `make test` (every extra + pytest): .[test]
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stellarparams run --out runs/default

test: $(STAMP)
	$(PY) -m pytest

# CI's second pass: the tests that touch numerics again with the CPU features turned down, so that a
# test which only passes on one instruction set or thread count fails here too (docs/design.md, Testing).
PORTABLE_ENV := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	MKL_CBWR=COMPATIBLE NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4" OPENBLAS_CORETYPE=Nehalem OMP_NUM_THREADS=1
NUMERIC_TESTS := model_folder simulate simulate_surveys train model uncertainty finetune resample prepare \
	augment evaluate dataset predict pipeline adapt partial_labels diagnose
test-portable: $(STAMP)
	env $(PORTABLE_ENV) $(PY) -m pytest $(NUMERIC_TESTS:%=tests/test_%.py)

clean:
	rm -rf $(VENV) runs
