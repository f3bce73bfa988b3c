# The few commands people type. Each works from a fresh clone.
.PHONY: install proto lint test demo quickstart bench

install:
	./scripts/setup.sh

proto:
	.venv/bin/python -m shardnet.wire.regen

lint:
	.venv/bin/ruff check src tests benchmarks servers clients
	.venv/bin/ruff format --check src tests benchmarks servers clients
	.venv/bin/lint-imports

test:
	./scripts/test.sh

demo:
	[ -x .venv/bin/shardnet ] || ./scripts/setup.sh
	.venv/bin/shardnet demo

quickstart:
	./scripts/quickstart.sh

bench:
	./benchmarks/run_all.sh
