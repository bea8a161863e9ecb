# Shoal: `make help` lists the targets.
SHELL := bash
.DEFAULT_GOAL := help
CARGO ?= cargo
PEERS ?= 6
TRACKERS ?= 3
# The compose project: prefixes containers, network and volumes (two users of one Docker host
# pick different ones). COMPOSE_PROJECT_NAME from the environment is honoured too.
PROJECT ?= $(or $(COMPOSE_PROJECT_NAME),shoal)
export COMPOSE_PROJECT_NAME := $(PROJECT)
# TLS=1: `make up` and `make demo` run every connection in mutual TLS with throwaway certificates.
TLS ?= 0
# MIRROR=1: `make up` adds a registry the peers mirror, their API published on loopback
# (docker/compose.mirror.yaml, docs/MIRROR.md).
MIRROR ?= 0

.PHONY: help build test alerts lint fmt image up down status e2e k8s-check bench bench-net bench-smoke fuzz demo mirror-demo

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## Build both binaries (release)
	$(CARGO) build --release --locked

test: alerts ## Run the whole test suite (alert rules, unit, integration with real processes)
	$(CARGO) test --release --locked

alerts: ## Check the alert rules with promtool and run their unit tests (promtool required in CI)
	bash tests/alerts/check.sh

lint: ## Formatting and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

image: ## Build the shoal-tracker, shoal-peer, shoal-origin and shoal-registry-demo images (FROM scratch, offline)
	bash docker/build.sh

up: image ## Start TRACKERS trackers, two seeders and PEERS peers with docker compose (detached; TLS=1: mutual TLS; MIRROR=1: a registry they mirror)
	TLS=$(TLS) MIRROR=$(MIRROR) bash docker/compose.sh up $(PEERS) $(TRACKERS)

status: ## Show the swarm converging (per-container progress from the metrics)
	bash docker/compose.sh status

down: ## Stop and remove everything `make up` created
	bash docker/compose.sh down

e2e: image ## Container end-to-end run with faults; exit code is the verdict
	python3 tests/e2e/run.py $(E2E_ARGS)

k8s-check: ## Render the Kubernetes manifests and validate them strictly, offline
	bash tests/k8s/validate.sh

bench: ## Full benchmarks beside BitTorrent (~20 min after the build): tables, target/bench/*.json, rewrites docs/BENCHMARKS.md
	$(CARGO) bench --locked --bench shoal -- full

bench-net: ## Swarm with every peer in its own network namespace, caps enforced by tc (root; ~3 min)
	$(CARGO) bench --locked --bench shoal -- full swarm_net

bench-smoke: ## Quick benchmarks at a small scale (CI): fail on any corrupted copy or lost registration
	$(CARGO) bench --locked --bench shoal -- smoke

demo: build ## Local swarm without Docker: tracker, seeder, peers, live status (TLS=1: mutual TLS); Ctrl-C stops
	TLS=$(TLS) bash tests/demo/run.sh

mirror-demo: build ## Registry mirror on loopback: docker-registry, agents, skopeo pulls through each, then metrics (offline)
	bash tests/demo/mirror.sh

FUZZ_SECONDS ?= 60
fuzz: ## Fuzz every decoder for FUZZ_SECONDS each (nightly + cargo-fuzz, installed if missing)
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	set -e; for t in $$($(CARGO) +nightly fuzz list --fuzz-dir tests/fuzz); do \
	  echo "== fuzz $$t ($(FUZZ_SECONDS)s)"; \
	  $(CARGO) +nightly fuzz run --fuzz-dir tests/fuzz $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096; \
	done
