# medflow — the two set-up commands of the README:
#   make demo   install everything (system packages when root, .venv, torch, Horovod) and run the demo DAG
#   make test   install everything and run the test suite
VENV      ?= .venv
CORES     ?= 2
PY        := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
SPEC      := containers/install.sh containers/constraints.txt pyproject.toml
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-quick benchmarks bench report clean help

help:
	@sed -n 's/^#   //p' Makefile

setup: $(VENV)/.medflow-complete

$(VENV)/.medflow-complete: $(SPEC)
	bash containers/install.sh $(VENV)

demo: setup
	$(SNAKEMAKE) --profile workflow/profiles/local --cores $(CORES)
	@$(PY) -c "import medflow.provenance as p, medflow.config as c; \
	  cfg = c.load('config.yaml'); print('report:', f\"{cfg['results']}/{p.site_name(cfg)}/report/report.html\")"

test: setup
	$(PY) -m pytest -q

test-quick: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(SNAKEMAKE) --profile workflow/profiles/local --cores $(CORES) benchmark

benchmarks: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf results data .snakemake
