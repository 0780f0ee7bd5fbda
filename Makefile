# The project's interface: CI, hooks and people run these same targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTO_OUT := python/sandboxd/_proto
# One template store for everything the tests and benches start: the Debian `base` is built into it
# once per checkout (`make base-template`, or the first test that needs it) and shared.
export SANDBOXD_TEMPLATE_STORE ?= $(abspath .cache/templates)

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

.PHONY: install
install: $(PY) ## build the Rust extension (release) and install sandboxd with test, dev and bench tools into .venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m sandboxd.agent.optimized  # the .opt-2.pyc files a standalone agent runs on (-OO; sandboxd/agent/optimized.py)

.PHONY: dev
dev: $(PY) ## rebuild the Rust extension into .venv after a Rust change (release build)
	$(VENV)/bin/maturin develop --release -q

.PHONY: proto
proto: ## regenerate the committed Python protobuf/gRPC code from proto/
	rm -rf $(PROTO_OUT) && mkdir -p $(PROTO_OUT)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --mypy_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/filesystem/filesystem.proto proto/process/process.proto
	sed -i -E 's/^from (filesystem|process) import /from sandboxd._proto.\1 import /' $(PROTO_OUT)/*/*.py $(PROTO_OUT)/*/*.pyi
	touch $(PROTO_OUT)/__init__.py $(PROTO_OUT)/filesystem/__init__.py $(PROTO_OUT)/process/__init__.py

.PHONY: lint
lint: ## cargo fmt --check, clippy -D warnings, ruff, mypy --strict
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy

.PHONY: fmt
fmt: ## format Rust and Python
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

.PHONY: host-deps
host-deps: ## apt-get the host tools templates need (mmdebstrap, skopeo); unpack the tests' busybox and registry
	bash scripts/host-deps.sh

.PHONY: base-template
base-template: ## build the Debian `base` template into .cache/templates once (a few minutes; root)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "base-template: SKIPPED: mmdebstrap --mode=root needs root"; \
	else \
		$(PY) -m sandboxd template build base --template-store "$$SANDBOXD_TEMPLATE_STORE" --data-dir .cache/template-cli; \
	fi

.PHONY: interpreter-template
interpreter-template: base-template ## build `code-interpreter-v1` (base + kernels + data stack from PyPI) into .cache/templates once (root)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "interpreter-template: SKIPPED: building templates needs root"; \
	else \
		$(PY) -m sandboxd template build code-interpreter-v1 --template-store "$$SANDBOXD_TEMPLATE_STORE" --data-dir .cache/template-cli; \
	fi

.PHONY: test-rust
test-rust: ## cargo test for the core crates
	cargo test --workspace --exclude sandboxd-py

.PHONY: test-py
test-py: interpreter-template ## pytest: the binding, the services over real loopback servers, the official E2B SDK
	$(VENV)/bin/pytest -q

# Every @e2b/code-interpreter create is a code-interpreter-v1 sandbox that returns once its Python
# kernel is warm (1-3 s here), so a test file of a dozen creates needs more than node's usual minute.
.PHONY: test-js
test-js: interpreter-template ## the official E2B JS SDK (@e2b/code-interpreter, pinned) against a real `sandboxd serve` (root, Node >= 20)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "test-js: SKIPPED: sandboxd serve needs root (namespaces, overlayfs, cgroups); run 'make test-js' as root"; \
	else \
		set -x; cd tests/js && npm ci --no-audit --no-fund && SANDBOXD_PYTHON=$(abspath $(PY)) node --test --test-timeout=120000; \
	fi

.PHONY: promtool
promtool: $(PY) ## promtool (Prometheus's /metrics linter) from Debian's archive into .venv/bin, for the metrics tests
	bash tests/tools/install_promtool.sh $(VENV)/bin

.PHONY: cluster-deps
cluster-deps: ## install etcd (Debian's etcd-server) for the local Kubernetes control plane, if missing
	@if command -v etcd >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "cluster-deps: etcd not found; run 'sudo make cluster-deps' (the Kubernetes tests skip without it)"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; fi

.PHONY: cluster
cluster: cluster-deps ## build kube-apiserver, kube-scheduler, kube-controller-manager from the Go module proxy (cached in .cluster/)
	bash deploy/local/build-kubernetes.sh

.PHONY: cluster-up
cluster-up: cluster ## run the local control plane in the foreground (prints KUBECONFIG; Ctrl-C stops it)
	$(PY) -m sandboxd.kube.localcluster up

.PHONY: conformance
conformance: ## the Connect conformance suite (connectrpc.com/conformance, via the Go module proxy) against the agent's Connect adapter
	@command -v go >/dev/null || { echo "conformance: needs Go (the suite is a Go module; 'go install' fetches it)"; exit 1; }
	$(PY) tests/conformance/run.py

FUZZ_EXAMPLES ?= 400

.PHONY: fuzz
fuzz: ## a short, bounded fuzz run (hypothesis) of the agent's and the runtime's HTTP parsing in process (tests/fuzz/fuzz_*.py); FUZZ_EXAMPLES=200000 for a long one
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -p no:cacheprovider tests/fuzz/fuzz_*.py

.PHONY: test
test: install lint cluster test-rust test-py test-js conformance fuzz ## everything CI runs: install, lint, the control plane, cargo test, pytest, JS SDK tests, conformance, fuzz

.PHONY: bench-deps
bench-deps: ## install the benches' baselines and clients (nginx, curl) with apt-get; `make install` does the rest
	bash benches/install_deps.sh

.PHONY: bench
bench: interpreter-template ## the full benchmark suite on the installed release build (Markdown table, JSON and PNG in benches/results/)
	@test -x $(PY) || { echo "bench: $(PY) not found: run 'make install' first"; exit 1; }
	$(PY) -m benches

.PHONY: bench-quick
bench-quick: interpreter-template ## the short benchmark suite, as CI runs it (under 3 minutes on 2 cores)
	@test -x $(PY) || { echo "bench-quick: $(PY) not found: run 'make install' first"; exit 1; }
	$(PY) -m benches --quick
