# Every target installs what it needs: a fresh clone needs only python3, a JDK 17, Maven
# and apt-get (the checking tools are unpacked from Debian's packages, not installed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REGIONS ?= cn eu

.DEFAULT_GOAL := help
.PHONY: help install demo check test test-unit test-integration test-e2e test-deploy deploy-check bench lint typecheck layers stack-up stack-down stack-status kafka-jars tools clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install vtp with its dev tools

kafka-jars: $(STAMP) ## resolve the pinned Apache Kafka jars with Maven into .cache/
	$(BIN)/vtp stack fetch

tools: $(STAMP) ## fetch or build the checking tools (promtool, amtool, helm, kubeconform, kube-score, …) into .cache/
	$(BIN)/python -m deploy.tools

demo: $(STAMP) kafka-jars ## run the whole pipeline on a simulated fleet and print what owners see
	$(BIN)/vtp demo

check: lint typecheck layers ## every static check: lint, types, the import contract

test: $(STAMP) kafka-jars tools check ## the checks, then the whole suite (unit, deploy, integration, e2e)
	$(BIN)/pytest -q -ra

test-unit: $(STAMP) ## unit tests only (no broker)
	$(BIN)/pytest -q -ra tests/unit

deploy-check: $(STAMP) tools ## every deploy/ artefact checked by its real tool (helm, kubeconform, kube-score, compose-go, promtool, amtool, Grafana's model, hadolint, yamllint)
	$(BIN)/pytest -q -ra tests/deploy

test-deploy: deploy-check ## the same as deploy-check

test-integration: $(STAMP) kafka-jars ## integration tests only (real broker and engine)
	$(BIN)/pytest -q -ra tests/integration

test-e2e: $(STAMP) kafka-jars ## end-to-end tests only (processes as users run them)
	$(BIN)/pytest -q -ra tests/e2e

bench: $(STAMP) kafka-jars ## measure throughput (vtp against a raw baseline), stages, owner API, vehicle edge
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.owner_api --fleet 40000 --fleet-samples 100000000
	$(BIN)/python -m bench.edge

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy: strict on schemas, the kernel and the stages' logic
	$(BIN)/mypy

layers: $(STAMP) ## the import graph by layer; fails on an upward import or a circle
	$(BIN)/python -m vtp.layers

stack-up: $(STAMP) kafka-jars ## start each region's own local Kafka broker (REGIONS="cn eu")
	for r in $(REGIONS); do $(BIN)/vtp stack up --region $$r || exit 1; done

stack-down: $(STAMP) ## stop the regions' local Kafka brokers
	for r in $(REGIONS); do $(BIN)/vtp stack down --region $$r; done

stack-status: $(STAMP) ## show whether each region's broker runs, and where
	for r in $(REGIONS); do $(BIN)/vtp stack status --region $$r; done

clean: ## remove the virtualenv, caches and all local data
	rm -rf $(VENV) var .pytest_cache
