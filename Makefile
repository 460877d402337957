# recsys-moe: `make demo` and `make test` on a fresh machine (each runs `setup` when .venv is
# missing or older than the requirements).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
# CUDA variant where nvidia-smi finds a GPU, else the CPU stack (DESIGN.md, version matrix).
VARIANT := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup demo test test-fast lint clean bench-setup spark-setup ui-setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/*.txt Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11+" >&2; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# 1. the pinned torch/fbgemm pair, 2. torchrec without its CUDA fbgemm requirement,
	# 3. the rest, 4. the project itself without re-resolving (keeps fbgemm-gpu-cpu in place).
	$(BIN)/pip install --quiet -r requirements/$(VARIANT).txt
	$(BIN)/pip install --quiet --no-deps -r requirements/torchrec.txt
	$(BIN)/pip install --quiet -r requirements/base.txt -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import torchrec, fbgemm_gpu, polars, mlflow, recsys_moe; print('setup ok:', '$(VARIANT)')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys-moe demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the quick loop: without the tests marked slow (end-to-end, distributed, sweeps; see pyproject);
# its own -m replaces addopts' "not gpu", so it says "not gpu" again
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

# peers for benchmarks/ (torch-rechub), --no-deps so the pinned stack stays as it is
bench-setup: $(STAMP)
	$(BIN)/pip install --quiet --no-deps -r requirements/bench.txt

# pyspark for scoring in Spark (tests marked spark; CI runs it), --no-deps as above
spark-setup: $(STAMP)
	$(BIN)/pip install --quiet --no-deps -r requirements/spark.txt
	$(BIN)/python -c "import pyspark; print('spark-setup ok: pyspark', pyspark.__version__)"

# the MLflow UI test (tests marked ui; CI runs it): Playwright's Python client drives the system's
# Chromium (Debian: apt-get install chromium); `playwright install` (a browser download) is not used
ui-setup: $(STAMP)
	@command -v chromium >/dev/null || { echo "error: chromium not found; install it (Debian: apt-get install chromium)" >&2; exit 1; }
	$(BIN)/pip install --quiet -r requirements/ui.txt
	$(BIN)/python -c "import playwright; print('ui-setup ok: playwright with', '$$(chromium --version 2>/dev/null)')"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo-run
