# Basalt's build. `make run` starts a local cluster, `make test` runs the tests; both install what they need.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN := $(CURDIR)/bin
DAEMONS := tools/cmd/basalt tools/cmd/basalt-bench tools/cmd/basalt-netbench tools/cmd/basalt-migbench metad/cmd/metad blockd/cmd/blockd computed/cmd/computed netd/cmd/netd netd/cmd/basalt-flowcount
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/basalt-hv/basalt/internal/buildinfo.version=$(VERSION)

# Pinned code generators for `make proto`, and the files it compiles (PROTO_FILES=proto/basalt/v1/vm.proto
# regenerates one file's code only).
PROTO_FILES ?= proto/basalt/v1/*.proto
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2

# Arguments for `basalt up`, e.g. make run ARGS='--blockd 5 --data-dir /tmp/basalt'.
ARGS ?=
# Extra flags for `go test`, e.g. make test TESTFLAGS='-run TestLease -v'.
TESTFLAGS ?=

.PHONY: all deps build run test test-short test-race vet fmt proto bench clean

all: build

deps:
	@./scripts/deps.sh

build: deps
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./,$(DAEMONS))

run: build
	$(BIN)/basalt up $(ARGS)

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

test: build vet
	BASALT_BIN_DIR=$(BIN) $(GO) test -count=1 -timeout 20m $(TESTFLAGS) ./...

# The whole suite under the race detector, with every daemon built with -race too (the e2e tests fail if a
# daemon reports a race). Slower than `make test`; not part of it.
test-race: deps
	@mkdir -p $(BIN)/race
	$(GO) build -race -o $(BIN)/race/ $(addprefix ./,$(DAEMONS))
	BASALT_BIN_DIR=$(BIN)/race $(GO) test -race -count=1 -timeout 40m $(TESTFLAGS) ./...

test-short: build
	BASALT_BIN_DIR=$(BIN) $(GO) test -count=1 -short $(TESTFLAGS) ./...

# Benchmarks, each against its peers in the same run; results go in docs/benchmarks.md. The block suites run
# fio against Basalt, qemu-nbd, nbdkit and the raw file; the network suite (root, iperf3) VXLAN with policies
# against a plain veth pair, and netd's convergence time; the migration suite live-migrates 512 MiB TCG guests
# under memory load (total time, downtime, bytes; with and without compression; 4 at once).
BENCHFLAGS ?=
NETBENCHFLAGS ?=
MIGBENCHFLAGS ?=
bench: build
	$(BIN)/basalt-bench --bin-dir $(BIN) $(BENCHFLAGS)
	$(BIN)/basalt-netbench $(NETBENCHFLAGS)
	$(BIN)/basalt-migbench $(MIGBENCHFLAGS)

# The chaos suite (chaos/README.md, root and QEMU needed): the harness's self-tests, then every scenario on its
# own multi-host cluster in network namespaces, each printing its timeline, bars and checks; ROUNDS=N runs N
# randomized rounds on one cluster instead. CHAOSFLAGS passes flags to basalt-chaos (e.g. --scenarios kill-host).
ROUNDS ?= 0
CHAOSFLAGS ?=
.PHONY: chaos
chaos: build
	$(GO) build -o $(BIN)/ ./chaos/cmd/basalt-chaos ./chaos/cmd/basalt-chaos-etcd
	BASALT_BIN_DIR=$(BIN) $(GO) test -count=1 ./chaos/check/ ./chaos/cluster/
	$(BIN)/basalt-chaos --bin-dir $(BIN) --rounds $(ROUNDS) $(CHAOSFLAGS)

proto:
	@command -v protoc >/dev/null || ./scripts/deps.sh
	GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	protoc -I proto -I /usr/include \
	  --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=proto --go_opt=paths=source_relative \
	  --plugin=protoc-gen-go-grpc=$(BIN)/protoc-gen-go-grpc --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
	  $(PROTO_FILES)

clean:
	rm -rf $(BIN)
