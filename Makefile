# The README's two commands: `make demo` runs the proxy, `make test` runs every test.
PYTHON ?= python3
DEBIAN_PYTHON ?= /usr/bin/python3

.PHONY: deps bench-deps demo test bench

deps:
	scripts/install-deps

bench-deps: deps
	bench/install-deps

demo: deps
	$(PYTHON) tests/rig/demo.py

# The suite runs twice: on the PyPI stack (pip, OpenSSL 4.0 in cryptography's wheel) and
# on Debian's packaged stack (/usr/bin/python3, python3-twisted, OpenSSL 3.0), the one
# that holds a TLS IDLE session in under 25 KiB (see README, Benchmark).
test: deps bench-deps
	$(PYTHON) -m pytest -q -p no:cacheprovider
	PYTHONPATH=$(CURDIR)/.debian-site:$(CURDIR) $(DEBIAN_PYTHON) -m pytest -q -p no:cacheprovider

bench: bench-deps
	$(PYTHON) bench/run.py
