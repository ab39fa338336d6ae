# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 4

.PHONY: demo paper test bench lint clean gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/compare.py --nproc $(NPROC) --out runs/demo

# Six strategies x {digits, lm} x 3 seeds on 2 gloo workers; writes docs/results.md + docs/paper_*.png.
paper: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/paper.py --nproc 2 --out runs/paper --docs docs

test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	mkdir -p runs
	$(PY) -m pytest benchmarks -q -s --benchmark-only --benchmark-json=runs/bench.json \
	  --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
	$(PY) benchmarks/report.py runs/bench.json

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
