# kms: two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-sm demo-openbao test test-fast lint bench cluster protos clean sm-token

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py --home demo-home --cards 1000

# The same flow with the SM card profile (SM4 keys, SM2-signed sections) on the development SM token (make sm-token).
demo-sm: setup
	$(PY) scripts/demo.py --profile dual-app-sm --home demo-home-sm --cards 1000

# The same flow with each PIN in a real OpenBao (bao server -dev) and each service as an OS user of its own: as root.
demo-openbao: setup
	$(PY) scripts/demo.py --secrets openbao --home demo-home-openbao --cards 1000

test: setup
	$(PY) -m pytest -q

# The pure tests only: no SoftHSM2 token, no server, no PostgreSQL, no OpenBao (markers set in tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -m "not hsm and not service and not postgres and not wheel and not openbao"

lint: setup
	$(VENV)/bin/ruff check kms tests scripts
	$(VENV)/bin/mypy

# A fresh development home in .bench/home per run; sizes and rounds: make bench BENCH_ARGS="--rounds 1 --cards 100".
bench: setup
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Several kms serve replicas on the local PostgreSQL under faults, and the invariants (docs/deployment.md, "Scale-out");
# `make cluster ARGS=--small` is the CI size, `make cluster ARGS=--bench` the 1/2/3-replica contention figures.
cluster: setup
	$(PY) scripts/cluster.py $(ARGS)

# The development SM token (deploy/softhsm2-sm/README.md): SoftHSM2 with SM4, SM2 and SM3, built once per patch into
# /var/cache/kms/softhsm2-sm (or $KMS_SM_TOKEN_CACHE); prints its prefix. The SM tests skip, saying so, without it.
sm-token:
	bash deploy/softhsm2-sm/build.sh

protos: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/kms/v1/*.proto

clean:
	rm -rf demo-home demo-home-sm demo-home-openbao .bench .cluster build *.egg-info .pytest_cache .mypy_cache .ruff_cache
