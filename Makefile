# medflow — the two set-up commands of the README:
#   make demo   install everything (system packages when root, .venv, torch, Horovod) and run the demo DAG
#   make test   install everything, check the code (make lint) and run the test suite
#   make lint   ruff (lint + format), mypy, import-linter: the checks CI and pre-commit run
VENV      ?= .venv
CORES     ?= 2
PY        := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
SPEC      := containers/install.sh containers/constraints.txt pyproject.toml
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-quick lint benchmarks bench report clean help

help:
	@sed -n 's/^#   //p' Makefile

setup: $(VENV)/.medflow-complete

$(VENV)/.medflow-complete: $(SPEC)
	bash containers/install.sh $(VENV)

demo: setup
	$(SNAKEMAKE) --profile workflow/profiles/local --cores $(CORES)
	@$(PY) -c "import medflow.core.provenance as p, medflow.core.config as c; \
	  cfg = c.load('config.yaml'); print('report:', f\"{cfg['results']}/{p.site_name(cfg)}/report/report.html\")"

test: setup lint
	$(PY) -m pytest -q

test-quick: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(SNAKEMAKE) --profile workflow/profiles/local --cores $(CORES) benchmark

benchmarks: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf results data .snakemake
