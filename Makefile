# The two commands of the README: `make quickstart` (set up, run the main job) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup system-deps quickstart test test-fast test-gpu bench

setup:  ## install hpsearch and its Python dependencies (torch from the local wheel cache where there is one)
	$(PIP) install -q -e '.[dev]'

system-deps:  ## Debian packages the tests use: Fashion-MNIST, Chromium, PostgreSQL, docker-compose
	.ci/install-system-deps

quickstart: setup  ## run the quickstart study offline on the embedded stores in ./runs
	hpsearch run studies/quickstart.yaml

# Two test processes (pytest-xdist), each kept on a CPU of its own (tests/conftest.py): most of
# the suite waits on servers, subprocesses and stores, so the second CPU would otherwise sit idle.
PYTEST_PROCS ?= 2

test: setup system-deps  ## the whole suite, slow tests included (what CI runs)
	$(PYTHON) -m pytest -q -n $(PYTEST_PROCS) --dist worksteal

test-fast: setup
	$(PYTHON) -m pytest -q -n $(PYTEST_PROCS) --dist worksteal -m "not slow and not gpu"

test-gpu: setup  ## the CUDA path (needs an NVIDIA GPU; CI has none)
	$(PYTHON) -m pytest -q -m gpu tests/test_gpu.py

bench: setup
	$(PYTHON) benchmarks/run_all.py
