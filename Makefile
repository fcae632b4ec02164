# The README's two commands: `make report` and `make test`. Each sets itself up on a fresh machine.
PROFILE  ?= quick
DATA_ROOT ?=
DEVICE   ?= auto
TRAIN    ?= 0
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed

.PHONY: setup report test bench lab browser

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch and torchvision first, pinned to the releases this machine keeps on local disk
# (pip takes them from there); then the project with its dev extra.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install "torch>=2.1,<2.15" "torchvision>=0.16,<0.30"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name hw2 --display-name "Python (hw2)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

report: $(STAMP)
	$(PY) -m hw2lib run --profile $(PROFILE) \
		$(if $(DATA_ROOT),-p data_root=$(DATA_ROOT)) -p device=$(DEVICE) \
		$(if $(filter 1 true yes,$(TRAIN)),-p train=True)

# The browser test (tests/e2e) needs Debian's Chromium; install it when we are root and it is missing.
# Where it cannot be had the e2e test skips with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		echo "installing Debian's chromium for the browser test ..." && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
		echo "chromium is not available: the e2e test will skip"

test: $(STAMP) browser
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

bench: $(STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/
