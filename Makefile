# xl-postcopy — build, test, run.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
BIN := bin

.PHONY: all deps build run test vet lint nocgo unit fuzz integration deb bench lab-test lab-bench lab-faults lab-shell clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(GO) build -o $(BIN)/xl-postcopy ./cmd/xl-postcopy
	CGO_ENABLED=0 $(GO) build -o $(BIN)/guest-balloon ./guest-balloon

# The main job on its built-in default: migrate a lab domain (no Xen host needed).
run: build
	$(BIN)/xl-postcopy lab migrate

# Everything CI checks: the Go checks first (a minute or two), then the nested Xen lab
# (root; 12–16 minutes from an empty cache on 2 cores, scripts/lab/README.md).
test: deps vet lint nocgo unit fuzz integration deb lab-test

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "not gofmt-formatted: $$unformatted"; exit 1; fi
	$(GO) vet ./...

# staticcheck (pinned in scripts/deps.sh) and go.mod/go.sum as `go mod tidy` would
# leave them.
lint:
	$$($(GO) env GOPATH)/bin/staticcheck ./...
	@$(GO) mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }

# The build without cgo or libxen-dev (a contributor's laptop): everything but the
# calls into Xen builds and its tests pass; CC=false proves no C is compiled. No -race:
# the race detector needs cgo.
nocgo:
	CGO_ENABLED=0 CC=false $(GO) vet ./...
	CGO_ENABLED=0 CC=false $(GO) build -o $(BIN)/nocgo/xl-postcopy ./cmd/xl-postcopy
	CGO_ENABLED=0 CC=false $(GO) test -count=1 -timeout 15m ./...

unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# Short fuzzing runs of the decoders on untrusted input (under a minute in all): the
# stream reader, each record decoder fed a body directly and behind a valid CRC
# (FuzzRecord), and the Xen domain configuration and core state. go test takes one -fuzz
# target at a time. Runs are counts of executions (a few seconds each at 15-40k/s), not
# durations: Go 1.26's fuzzing coordinator can fail a timed run at its deadline with a bare
# "context deadline exceeded" (golang/go#75804). -fuzzminimizetime bounds the minimizing
# of each new input, which at the default 60 s would take most of a short run.
FUZZ = $(GO) test -run '^$$' -fuzzminimizetime 100x
fuzz:
	$(FUZZ) -fuzz '^FuzzDecode$$' -fuzztime 40000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzRecord$$' -fuzztime 100000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzDomainHeader$$' -fuzztime 60000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzPageBatch$$' -fuzztime 60000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzPFNs$$' -fuzztime 30000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzDone$$' -fuzztime 40000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzPageSet$$' -fuzztime 40000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzSwitchover$$' -fuzztime 20000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzAck$$' -fuzztime 20000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzU64$$' -fuzztime 20000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzBlob$$' -fuzztime 30000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzResume$$' -fuzztime 20000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzResumeAck$$' -fuzztime 30000x ./xen/wire
	$(FUZZ) -fuzz '^FuzzDomainConfig$$' -fuzztime 60000x ./xen/xendom
	$(FUZZ) -fuzz '^FuzzCoreState$$' -fuzztime 40000x ./xen/xendom
	@if ls xen/prerecord/*_test.go >/dev/null 2>&1 && grep -q 'func FuzzBuild' xen/prerecord/*_test.go; then \
		$(FUZZ) -fuzz '^FuzzBuild$$' -fuzztime 50000x ./xen/prerecord; fi

integration: build
	scripts/check-lab-modes.sh $(BIN)/xl-postcopy

# The nested Xen lab (Xen 4.17 under QEMU TCG; root): see scripts/lab/README.md. The built-in
# scenarios post-copy with --prepaging dual only; LAB_PC_POLICIES=dual:record+lr+dbscan adds the
# pre-record migration (about 6 more minutes).
lab-test:
	scripts/lab/lab-test.sh

# The measurement run (not in make test; root, about 30 minutes): the light guest's
# post-copy against xl migrate, the paging primitives, and the heavy writer of
# scripts/lab/bench/, each post-copy with dual and record+lr+dbscan.
LAB_BENCH_SCENARIOS = scripts/lab/dom0/scenarios/50-postcopy-migrate.sh scripts/lab/dom0/scenarios/60-paging-bench.sh $(wildcard scripts/lab/bench/*.sh)
lab-bench:
	LAB_BUILTIN=0 LAB_PC_POLICIES=$${LAB_PC_POLICIES:-dual:record+lr+dbscan} LAB_TIMEOUT=$${LAB_TIMEOUT:-4800} \
		LAB_EXTRA_SCENARIOS="$(LAB_BENCH_SCENARIOS)" scripts/lab/lab-test.sh

# The fault-injection matrix on lab domains (docs/RELIABILITY.md): a link reset and a 2 s
# outage at each protocol point, 10 runs each, post-copy and hybrid (about 17 minutes),
# then a 60 s outage at five points either side of GO, post-copy (about 46 minutes).
lab-faults: build
	$(BIN)/xl-postcopy lab faults --runs $${RUNS:-10} --faults reset,2s -o $(BIN)/faults.md
	$(BIN)/xl-postcopy lab faults --runs $${RUNS:-10} --faults 60s --mode postcopy \
		--points setup,right-after-go,mid-fault-reply,mid-push,ack -o $(BIN)/faults-60s.md

lab-shell:
	scripts/lab/lab-shell.sh

# Debian 12 packages in bin/deb: xl-postcopy (dom0: binary, man pages, bash completion)
# and xl-postcopy-guest (static guest-balloon, systemd unit); dpkg-buildpackage/debhelper
# (installed if missing). Install with dpkg -i bin/deb/*.deb.
deb: deps
	scripts/deb/build.sh $(BIN)/deb

bench: build
	$(BIN)/xl-postcopy bench --link 1gbit --out docs/bench

clean:
	rm -rf $(BIN)
