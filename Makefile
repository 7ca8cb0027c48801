# egressnat: build, generate, test, demo.
# `make test` and `make demo` install what they need on a fresh Debian
# machine as root (apt-get packages, Go modules, the test API server).
# `make test-unit` needs neither root nor any of that (only Go and the modules).

SHELL := /bin/bash
GO ?= go
BIN ?= bin
CONTROLLER_GEN ?= $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0
GEN_CRD_DIR ?= manifests/crds
GEN_OBJ_DIR ?= api/v1
DEB_PACKAGES := etcd-server nftables iproute2 iptables conntrack ipset
export EGRESSNAT_CACHE ?= $(HOME)/.cache/egressnat

.PHONY: all build generate deps kube-binaries vet test test-unit demo clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...
	cp $(BIN)/egressnatctl $(BIN)/kubectl-egressnat

generate:
	$(CONTROLLER_GEN) object paths=./api/... output:object:dir=$(GEN_OBJ_DIR) \
		crd:crdVersions=v1 output:crd:dir=$(GEN_CRD_DIR)

# deps installs the machine's packages (when missing) and the Go modules.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(GO) mod download
	cd test/tools/kube && $(GO) mod download

# kube-binaries builds and caches kube-apiserver and kubectl (minutes, once);
# kube-proxy for the targets that run it, with kube-router (the lab's
# NetworkPolicy implementation, lab use only).
kube-binaries: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries

.PHONY: kube-proxy
kube-proxy: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries -kube-proxy -kube-router

vet:
	$(GO) vet ./...

# test-unit runs, as any user, the tests that need no root, no network
# namespace, no kernel nftables and no kube-apiserver/etcd/kubectl: under
# -short the others skip (each such test or TestMain checks testing.Short()).
# Under a minute on 2 cores with a warm build cache.
test-unit:
	$(GO) test -short -count=1 ./...

# test runs every tier, one package at a time (the lab tests measure timing
# and must not share two cores): vet, unit tests, generated-file freshness,
# the real API server tests, the kernel tests in network namespaces, the lab
# end-to-end (on the default lab: routed /32 pods, loose rp_filter,
# iptables-nft masquerade, kube-proxy in nftables mode) and failover
# tests; then the end-to-end suite again on every lab mode of E2E_MATRIX.
test: deps kube-binaries kube-proxy build vet
	$(GO) test -count=1 -p 1 -timeout 40m ./...
	$(MAKE) --no-print-directory e2e-matrix

# E2E_MATRIX: the lab modes the end-to-end suite also runs on in make test
# (test/cluster.ParseMode: pod network, rp_filter, CNI masquerade, MTUs,
# kube-proxy mode). Each takes about 80 s on 2 cores.
E2E_MATRIX ?= overlay/strict/iptables-nft/kp-iptables \
	overlay/strict/nft/kp-nftables \
	routed/strict/iptables-legacy/mtu1450/podmtu1500/kp-iptables \
	overlay/off/iptables-legacy/mtu1450/kp-nftables

.PHONY: e2e-matrix
e2e-matrix: deps kube-binaries kube-proxy build
	@for m in $(E2E_MATRIX); do \
		echo "e2e on lab mode $$m"; \
		EGRESSNAT_E2E_MODE=$$m $(GO) test -count=1 -timeout 15m ./test/e2e/ || exit 1; \
	done

demo: deps kube-binaries build
	$(GO) run ./test/cluster/cmd/demo $(DEMO_FLAGS)

clean:
	rm -rf $(BIN)

# bench-failover: 20 gateway node losses under 20 long-lived connections;
# ends with `failover p50_ms=.. p99_ms=.. survived=k/m` (see BENCHMARKS.md).
.PHONY: bench-failover
bench-failover: deps kube-binaries build
	$(GO) run ./test/cluster/cmd/bench-failover $(BENCH_FLAGS)

# chaos: a randomized fault campaign (cables, switch partitions, API server,
# operator leader, agents, node reboots, CPU starvation) on a lab cluster of
# cp1 and three workers, watched from outside the nodes (ARP from the router
# every 50 ms, packet sources at an external host); ends with
# `chaos faults=<n> violations=<k> max_dual_holder_ms=<d> max_outage_ms=<o>`
# and exits 1 when k > 0. Default 10 minutes; e.g.
# make chaos CHAOS_FLAGS="-duration 5m -seed 7"
.PHONY: chaos
chaos: deps kube-binaries build
	$(GO) run ./test/cluster/cmd/chaos $(CHAOS_FLAGS)

# bench-scale: 20,000 pods, 1,000 policies, 20 gateways through the real API
# server; programming latency, full resync, memory, assignment and
# per-packet cost; ends with `scale programming_p99_ms=.. resync_ms=..
# agent_rss_mb=.. packet_ratio=.. linear_ratio=..` (see BENCHMARKS.md).
# Smaller: make bench-scale BENCH_FLAGS="-pods 2000 -policies 100".
.PHONY: bench-scale
bench-scale: deps kube-binaries build
	$(GO) run ./test/cluster/cmd/bench-scale $(BENCH_FLAGS)

# badinput: on a lab cluster with a real kube-proxy (nftables mode, built
# from the k8s.io/kubernetes module on first use) it makes 25+ hostile or
# mistaken objects one at a time and checks each was rejected or reported,
# harmed no node and no pod/node/Service/external traffic, and left nothing
# behind; one line per object, last `badinput tried=<n> harmed=<k>`, exit 1
# when k > 0. Subsets: make badinput BADINPUT_FLAGS="-only floating-ip -v".
.PHONY: badinput
badinput: deps kube-binaries kube-proxy
	$(GO) run ./test/badinput $(BADINPUT_FLAGS)
