# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 4

.PHONY: demo paper test bench lint clean

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
	mkdir -p runs
	$(PY) -m pytest benchmarks -q -s --benchmark-only --benchmark-json=runs/bench.json \
	  --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
	$(PY) benchmarks/report.py runs/bench.json

lint: $(STAMP)
	$(PY) -m ruff check local_opt samplers tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
