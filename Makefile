# make test       create .venv if missing, install requirements, run the test suite
# make reproduce  all five experiments x 3 seeds on the embedded default, then reports/<name>/REPORT.md and
#                 the per-seed results in docs/results/<name>/ (CONFIG=configs/<preset>.py for a paper
#                 setting; ARGS='--seeds=[3,4] --jobs=2' for more options: python reproduce.py --help)
# make reproduce-fast  the same at cheaper budgets (configs/mnist_5k_fast_cpu.py, no variants, 2 jobs):
#                 3 seeds on 2 CPU cores, measured in docs/benchmarks.md
# make train      train the default run (embedded mnist_5k) with gradient accounting
# make bench      the benchmarks in bench/ (ratios against a baseline run side by side)
PY := .venv/bin/python
CONFIG ?=

.PHONY: test train bench venv reproduce reproduce-fast
venv: .venv/installed
.venv/installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

reproduce: venv
	$(PY) reproduce.py $(CONFIG) $(ARGS)

reproduce-fast: venv
	$(PY) reproduce.py configs/mnist_5k_fast_cpu.py --variant_seeds=0 --jobs=2 $(ARGS)

train: venv
	$(PY) gradient_accounting.py $(CONFIG)

bench: venv
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done
