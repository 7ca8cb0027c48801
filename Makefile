# egressnat: build, generate, test, demo.
# `make test` and `make demo` install what they need on a fresh Debian
# machine as root (apt-get packages, Go modules, the test API server).
# `make test-unit` needs neither root nor any of that (only Go, the modules and
# clang/llvm for the eBPF object: `make bpf` once as root installs them).

SHELL := /bin/bash
GO ?= go
BIN ?= bin
CONTROLLER_GEN ?= $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0
GEN_CRD_DIR ?= manifests/crds
GEN_OBJ_DIR ?= api/v1
DEB_PACKAGES := etcd-server nftables iproute2 iptables conntrack ipset containerd runc containernetworking-plugins
export EGRESSNAT_CACHE ?= $(HOME)/.cache/egressnat
# VERSION and COMMIT are stamped into the binaries (cmd/internal/version)
# with LDFLAGS, which every target building a release binary passes to
# `go build -ldflags "$(LDFLAGS)"`. LDFLAGS is not taken from the
# environment (where it often holds a C linker's flags): override it on the
# command line.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null)
VERSION_PKG := github.com/egressnat/egressnat/cmd/internal/version
LDFLAGS = -X $(VERSION_PKG).Version=$(VERSION) -X $(VERSION_PKG).Commit=$(COMMIT)

.PHONY: all build generate deps kube-binaries vet test test-unit demo clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...
	cp $(BIN)/egressnatctl $(BIN)/kubectl-egressnat

# image: the product image, ghcr.io/egressnat/egressnat:IMAGE_TAG (default:
# manifests/kustomization.yaml's newTag), built offline (no docker daemon,
# no registry: test/image/cmd/mkimage) from static binaries into an OCI
# archive, IMAGE_OUT; prints its name, path, digest and size. Load it with
# `ctr -n k8s.io images import bin/egressnat-image.tar` (or docker load -i).
# The same image as the Dockerfile's. E.g. make image IMAGE_TAG=v0.2.0;
# the test images: go run ./test/image/cmd/mkimage -image all.
IMAGE_TAG ?=
IMAGE_OUT ?= $(BIN)/egressnat-image.tar
.PHONY: image
image:
	CGO_ENABLED=0 GOOS=linux $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(BIN)/image/ ./cmd/...
	$(GO) run ./test/image/cmd/mkimage -bin $(BIN)/image -o $(IMAGE_OUT) -version "$(VERSION)" $(if $(IMAGE_TAG),-tag $(IMAGE_TAG))

# generate: the CRDs and deep copies (controller-gen, checked in), and the
# eBPF pod classifier (bpf).
generate: bpf
	$(CONTROLLER_GEN) object paths=./api/... output:object:dir=$(GEN_OBJ_DIR) \
		crd:crdVersions=v1 output:crd:dir=$(GEN_CRD_DIR)

# bpf builds the eBPF pod classifier's object from nft/bpf/src/*.c with
# bpf2go and Debian's clang and llvm (installed when missing, as root):
# nft/bpf/classifier_bpfel.o, a build output (not in git), and its Go
# bindings, classifier_bpfel.go (checked in). The Go package embeds the
# object: every target that compiles ./... needs this first.
BPF_PACKAGES := clang llvm
.PHONY: bpf
bpf:
	@missing=""; for p in $(BPF_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	cd nft/bpf && $(GO) generate ./

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
	cd test/tools/kube-floor && $(GO) mod download

# kube-binaries builds and caches kube-apiserver and kubectl (minutes, once);
# kube-proxy for the targets that run it, with kube-router (the lab's
# NetworkPolicy implementation, lab use only).
kube-binaries: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries

.PHONY: kube-proxy
kube-proxy: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries -kube-proxy -kube-router

# kube-test-binaries: what make test needs besides: kube-controller-manager
# (test/deploy runs its ClusterRole aggregation controller) and the
# kube-apiserver and kubectl of the oldest supported release (test/floor,
# from test/tools/kube-floor). Minutes, once.
.PHONY: kube-test-binaries
kube-test-binaries: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries -controller-manager -floor

vet: bpf
	$(GO) vet ./...

# test-unit runs, as any user, the tests that need no root, no network
# namespace, no kernel nftables and no kube-apiserver/etcd/kubectl: under
# -short the others skip (each such test or TestMain checks testing.Short()).
# Under a minute on 2 cores with a warm build cache.
test-unit: bpf
	$(GO) test -short -count=1 ./...

# test runs every tier, one package at a time (the lab tests measure timing
# and must not share two cores): vet, unit tests, generated-file freshness,
# the real API server tests, the kernel tests in network namespaces, the lab
# end-to-end (on the default lab: routed /32 pods, loose rp_filter,
# iptables-nft masquerade, kube-proxy in nftables mode), the real-cluster
# end-to-end (test/realcluster, as make test-cluster) and failover tests;
# then the end-to-end suite again on every lab mode of E2E_MATRIX and the
# real-cluster suite on every mode of CLUSTER_MATRIX.
test: deps bpf kube-binaries kube-proxy kube-test-binaries kube-cluster build vet
	$(GO) test -count=1 -p 1 -timeout 40m ./...
	$(MAKE) --no-print-directory e2e-matrix
	$(MAKE) --no-print-directory cluster-matrix

# E2E_MATRIX: the lab modes the end-to-end suite also runs on in make test
# (test/cluster.ParseMode: pod network, rp_filter, CNI masquerade, MTUs,
# kube-proxy mode, and "ebpf" for the agents' eBPF pod classifier instead
# of the nftables one). Each takes about 80 to 110 s on 2 cores.
E2E_MATRIX ?= overlay/strict/iptables-nft/kp-iptables \
	overlay/strict/nft/kp-nftables/ebpf \
	routed/strict/iptables-legacy/mtu1450/podmtu1500/kp-iptables \
	routed/loose/iptables-nft/kp-nftables/ebpf \
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

# kube-cluster builds and caches what a real cluster runs besides the API
# server: kubelet, kube-controller-manager, kube-scheduler and kube-proxy,
# from the same k8s.io/kubernetes module (minutes each, once).
.PHONY: kube-cluster
kube-cluster: deps
	$(GO) run ./test/apiserver/cmd/kube-binaries -kube-proxy -cluster

# cluster: a real Kubernetes cluster on this machine (nodes cp1, worker1,
# worker2 in network namespaces, each with Debian's containerd, runc and CNI
# plugins and a kubelet; kube-controller-manager, kube-scheduler and
# kube-proxy), the egressnat image built offline and imported into every
# node's runtime, `kubectl apply -k manifests/`, then the seed scenario on
# real pods. Tears down at the end; make cluster CLUSTER_FLAGS=-keep keeps it
# running until Ctrl-C (it prints the kubeconfig); -mode picks a lab mode.
.PHONY: cluster
cluster: deps kube-binaries kube-cluster
	$(GO) run ./test/cluster/cmd/cluster $(CLUSTER_FLAGS)

# test-cluster: the real-cluster end-to-end suite (test/realcluster): the
# install as a user does it, the seed scenario, the leak window with
# kubelet-written pod IPs, a rolling update of the DaemonSet during traffic,
# the loss of a gateway node, and the uninstall leaving nothing on the
# nodes. About 3 minutes on 2 cores.
.PHONY: test-cluster
test-cluster: deps kube-binaries kube-cluster
	$(GO) test -count=1 -v -timeout 20m ./test/realcluster/

# CLUSTER_MATRIX: the lab modes the real-cluster suite also runs on in make
# test (the default mode runs within go test ./...).
CLUSTER_MATRIX ?= overlay/strict/iptables-legacy/kp-iptables

.PHONY: cluster-matrix
cluster-matrix: deps kube-binaries kube-cluster
	@for m in $(CLUSTER_MATRIX); do \
		echo "real-cluster e2e on lab mode $$m"; \
		EGRESSNAT_E2E_MODE=$$m $(GO) test -count=1 -timeout 20m ./test/realcluster/ || exit 1; \
	done
