# The README's two commands: `make demo` runs the proxy, `make test` runs every test.
# Python packages go into the project's virtualenvs (scripts/venvs), never into the
# system's Python; scripts/install-deps installs only Debian packages (apt).
PYTHON ?= python3
PYTEST = -m pytest -q -p no:cacheprovider

.PHONY: deps venvs bench-deps demo test bench wheel

deps:
	scripts/install-deps

venvs: deps
	PYTHON=$(PYTHON) scripts/venvs

bench-deps: deps
	PYTHON=$(PYTHON) scripts/venvs .venv
	bench/install-deps

demo: deps
	PYTHON=$(PYTHON) scripts/venvs .venv
	.venv/bin/python tests/rig/demo.py

# The suite runs three times: on the latest releases from PyPI (.venv), on the declared
# minimum versions (.venv-min, constraints/minimum.txt), and on Debian 12's packaged
# stack (.venv-debian: python3-twisted, python3-openssl on OpenSSL 3.0, the one that
# holds a TLS IDLE session in about 23 KiB; see README, Install and Benchmark).
test: venvs bench-deps
	@echo "== mypy --strict on the sans-IO modules"
	.venv/bin/python scripts/typecheck
	@echo "== the suite on the latest releases (.venv)"
	.venv/bin/python $(PYTEST)
	@echo "== the suite on the declared minimum versions (.venv-min)"
	.venv-min/bin/python $(PYTEST)
	@echo "== the suite on Debian's packaged stack (.venv-debian)"
	.venv-debian/bin/python $(PYTEST)

bench: bench-deps
	.venv/bin/python bench/run.py

# dist/imapproxy-VERSION-py3-none-any.whl, for scripts/install-proxy (README, Install).
# Built in a throwaway venv: needs python3-venv only, not the test stack.
wheel:
	rm -rf .venv-build build
	$(PYTHON) -m venv .venv-build
	.venv-build/bin/python -m pip --disable-pip-version-check -q wheel --no-deps -w dist .
	rm -rf .venv-build build
	@ls dist/*.whl
