# The README's two commands: `make demo` runs the proxy, `make test` runs every test.
PYTHON ?= python3

.PHONY: deps bench-deps demo test bench

deps:
	scripts/install-deps

bench-deps: deps
	bench/install-deps

demo: deps
	$(PYTHON) tests/rig/demo.py

test: deps bench-deps
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: bench-deps
	$(PYTHON) bench/run.py
