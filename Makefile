# kpfree — see README.md. `make test` is what CI runs (as root, fresh machine).
SHELL := /usr/bin/env bash
GO ?= go
export PATH := /usr/local/go/bin:$(PATH)
export CGO_ENABLED ?= 0
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/kpfree/kpfree/internal/version.Version=$(VERSION)
BIN := bin
PKGS := ./...

.PHONY: all build demo-preflight image images deps test test-unit test-integration test-kernels test-e2e generate verify lint demo bench clean k8s-binaries

all: build

## image: the kpfree-agent image (OCI archive + docker archive in _out/), no Docker needed
image: build
	$(GO) run ./hack/agent-image --bin $(BIN)/kpfree-agent --tag $(VERSION) --out-dir _out

## k8s-binaries: Kubernetes v1.34.4 + etcd + CoreDNS + agnhost from the Go module proxy, cached in ~/.cache/kpfree
k8s-binaries:
	test/k8s/build.sh

## images: the image set kubeadm wants (built from the binaries above), for lab nodes
images: k8s-binaries
	$(GO) run ./test/images --out $${KPFREE_CACHE:-$$HOME/.cache/kpfree}/images/k8s-v1.34.4.tar

## build: the kpfree CLI and the agent into ./bin
build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/kpfree ./cmd/kpfree
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/kpfree-agent ./cmd/kpfree-agent

## deps: Debian packages the tests need (root; no-op when present)
deps:
	hack/install-deps.sh

## test: everything CI runs
test: deps verify test-unit test-integration test-kernels test-e2e

## test-unit: pure logic, no root, seconds
test-unit:
	$(GO) test -short -count=1 $(PKGS)

## test-integration: root; netns lab nodes with real sshd, BPF, apiserver
test-integration: build k8s-binaries
	KPFREE_BIN=$(CURDIR)/$(BIN)/kpfree $(GO) test -count=1 -p 1 -timeout 30m -run 'Integration' $(PKGS)

## test-e2e: kubeadm + kubelet + containerd on lab nodes
test-e2e: build k8s-binaries
	KPFREE_BIN=$(CURDIR)/$(BIN)/kpfree $(GO) test -count=1 -p 1 -timeout 60m -run 'E2E' $(PKGS)

## test-kernels: the datapath tests inside Debian's 5.10 and 6.1 kernels under qemu
KERNELS ?= default
KERNEL_TIMEOUT ?= 8m
KERNEL_TESTFLAGS ?= -test.count=1
test-kernels:
	rm -rf $(BIN)/kernel-tests && mkdir -p $(BIN)/kernel-tests
	CGO_ENABLED=0 $(GO) test -c -o $(BIN)/kernel-tests/ ./bpf/... ./agent/lbmap/... ./test/kernels/smoke
	test/kernels/fetch.sh $(KERNELS)
	test/kernels/run.sh $(KERNELS) -timeout $(KERNEL_TIMEOUT) -log-dir $(BIN)/kernel-tests/logs $(BIN)/kernel-tests/*.test -- $(KERNEL_TESTFLAGS)

## generate: regenerate bpf2go objects and other generated files
generate:
	$(GO) generate ./bpf/...

## verify: gofmt, go vet, go.mod tidy, generated files up to date
verify: lint
	@hack/verify-generated.sh

## lint: gofmt + go vet
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^test/k8s/')); if [[ -n "$$out" ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

## demo-preflight: a 3-node SSH lab and kpfree preflight against it
demo-preflight: deps build
	hack/demo.sh

## demo: a local 2-node kubeadm lab, then the main job against it: kpfree init + kpfree verify
demo: deps build
	hack/demo-init.sh

## bench: benchmarks (never part of test)
bench: deps build
	test/bench/run.sh

clean:
	rm -rf $(BIN)
