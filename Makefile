# One-command set-up on a fresh machine: `make test` (tests) and `make demo` (the synthetic-user demo).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch pinned for development and CI only; the pack itself never pins torch.
TORCH ?= torch==2.13.0

.PHONY: venv test lint demo bench realsize test-comfyui mutate

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# One pytest worker per core (tests run single-threaded); tests that share a trained world share a worker.
TEST_WORKERS ?= auto
test: venv lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/ppd-train demo --out runs/demo

# The CPU-sized benchmarks (about 11 minutes on 2 cores; real widths by default under CUDA) and their plot.
BENCH_OUT ?= bench-results
bench: venv
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/sampler_overhead.py --out $(BENCH_OUT)/sampler_overhead.json
	$(PY) benchmarks/dpo_step.py --out $(BENCH_OUT)/dpo_step.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/embedding_throughput.py --out $(BENCH_OUT)/embedding_throughput.json
	$(PY) benchmarks/training_scaling.py --out $(BENCH_OUT)/training_scaling.json
	$(PY) benchmarks/optimizer_step.py --out $(BENCH_OUT)/optimizer_step.json
	$(PY) benchmarks/optimizer_accuracy.py --out $(BENCH_OUT)/optimizer_accuracy.json
	$(PY) benchmarks/plot.py $(BENCH_OUT) --out $(BENCH_OUT)/performance.svg

# Every path once at the released model configs with random weights, no downloads (docs/performance.md "Real size"):
# wall time and peak memory per path, each in a fresh process; about an hour on 2 CPU cores (float32, short lengths),
# bf16 and the paper's lengths under CUDA. With COMFYUI_DIR set, also the nodes' path, in COMFYUI_PYTHON.
# REALSIZE="--only prepare,embed_direct" runs some paths (and what they need).
REALSIZE ?=
realsize: venv
	mkdir -p $(BENCH_OUT)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/realsize.py --out $(BENCH_OUT)/realsize.json --work $(BENCH_OUT)/realsize-work \
	  --comfyui-python "$(COMFYUI_PYTHON)" $(REALSIZE)

# Tests against a real ComfyUI (docs/testing-comfyui.md): COMFYUI_DIR=<checkout> make test-comfyui COMFYUI_PYTHON=<its python>
COMFYUI_PYTHON ?= python3
test-comfyui:
	@test -n "$(COMFYUI_DIR)" || (echo "Set COMFYUI_DIR to a ComfyUI checkout (docs/testing-comfyui.md)"; exit 2)
	COMFYUI_DIR=$(COMFYUI_DIR) HF_HUB_OFFLINE=1 $(COMFYUI_PYTHON) -m pytest -q tests/comfyui tests/test_nodes.py

# Mutation testing with mutmut (docs/mutation.md): hours on 2 cores, results kept in mutants/ (`mutmut show NAME`
# prints one mutant). Each mutant runs only the tests that reach its function; train.py and pair_step.py (the DPO
# step it shares with tune-user) and tune.py go last, in a run of their own. MUTATE="loss embedding" mutates only
# those modules. Every module here must also be in pyproject's [tool.mutmut] only_mutate.
MUTATE ?= loss safetensors_io checkpoint embedding user_attention adapter pairs stage_c evaluate synthetic optim \
	pair_writer run_lock picker confidence
MUTATE_LAST ?= train pair_step tune
MUTATE_JOBS ?= 2
mutate: venv
	mkdir -p mutants
	set -e; export PATH="$(abspath $(VENV))/bin:$$PATH" HF_HUB_OFFLINE=1; \
	n=0; for group in "$(MUTATE)" "$(MUTATE_LAST)"; do \
	  test -n "$$group" || continue; n=$$((n + 1)); names=$$(for m in $$group; do printf '"ppd_train.%s.*" ' $$m; done); \
	  echo "mutating: $$group (log: mutants/run-$$n.log)"; \
	  eval mutmut run --max-children $(MUTATE_JOBS) $$names > mutants/run-$$n.log 2>&1 \
	    || { tail -n 30 mutants/run-$$n.log; exit 1; }; \
	done
	$(PY) tools/mutation_report.py | tee mutants/report.md
