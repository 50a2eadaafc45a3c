# tungate — see README.md. `make test` is what CI runs (through .ci/run).

GO            ?= go
BIN           ?= bin/tungate
VERSION       ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS       := -s -w -X main.version=$(VERSION)
STATICCHECK   := $(shell $(GO) env GOPATH)/bin/staticcheck
# Debian packages the end-to-end tests start as real peers.
DEB_PACKAGES  := iproute2 dante-server microsocks tinyproxy dnsmasq-base iperf3 nftables unbound dnsutils curl chromium
# Packages whose tests move real packets through the lab; they run without
# -race, under which gVisor spins.
E2E_PKGS      := ./e2e/...
UNIT_PKGS     := $(shell $(GO) list ./... 2>/dev/null | grep -v -e /e2e)
CROSS         := linux/amd64 linux/arm64 darwin/amd64 darwin/arm64

# How long each native fuzzer runs in `make fuzz` (part of `make test`).
FUZZTIME      ?= 60s

.PHONY: all build run deps test unit e2e fuzz lint cross bench clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/tungate

# Runs tungate on the embedded default configuration (needs root for the TUN).
run: build
	./$(BIN) run

# Installs what the tests need on a fresh Debian machine: the peer daemons,
# the Go modules and staticcheck.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(GO) mod download
	@test -x $(STATICCHECK) || $(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2

test: deps lint cross unit e2e fuzz

unit:
	$(GO) test -race -count=1 $(UNIT_PKGS)

# The whole end-to-end suite runs twice: TUN offloads on (auto) and off.
e2e: build
	TUNGATE_BIN=$(CURDIR)/$(BIN) TUNGATE_E2E_OFFLOAD=auto $(GO) test -count=1 -p 1 -timeout 15m -v $(E2E_PKGS)
	TUNGATE_BIN=$(CURDIR)/$(BIN) TUNGATE_E2E_OFFLOAD=off $(GO) test -count=1 -p 1 -timeout 15m -v $(E2E_PKGS)

# Every native fuzzer in the tree, each for FUZZTIME (a crash fails the run
# and leaves its input in the package's testdata/fuzz). Minimizing is cut
# to one try: a minimization still running when FUZZTIME ends is reported
# by go test as a failure ("context deadline exceeded").
fuzz:
	@for pkg in $(UNIT_PKGS); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "fuzz $$pkg $$f for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 1x $$pkg || exit 1; \
		done; \
	done

lint:
	@fmt=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...
	GOOS=darwin $(GO) vet ./...

cross:
	@for t in $(CROSS); do \
		echo "build $$t"; \
		CGO_ENABLED=0 GOOS=$${t%/*} GOARCH=$${t#*/} $(GO) build -trimpath -o /dev/null ./cmd/tungate || exit 1; \
	done

# The benchmark harness (bench/, never with -race): tungate and the kernel
# path side by side in a namespace lab, as root; writes bench/results/latest.{md,json}.
# TUNGATE_BENCH_OFFLOAD=off measures the plain TUN.
bench: build
	TUNGATE_BENCH=1 TUNGATE_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -run TestBench -v -timeout 20m ./bench

clean:
	rm -rf bin
