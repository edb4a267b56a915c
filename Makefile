# Local set-up on a CPU machine: CPU torch pinned (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: setup browser test test-fast lint demo clean

$(BIN)/eep: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(BIN)/eep

setup: $(BIN)/eep

# Debian's Chromium for the dashboard's browser test (Playwright drives /usr/bin/chromium; it cannot
# download a browser of its own here). Does nothing when Chromium is there or apt-get is not; a
# failed install only warns: the browser test then skips and says why.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get; install Chromium (or set EEP_CHROMIUM) or the browser test skips"; \
	else \
		sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$sudo apt-get install -y -q chromium chromium-driver \
		|| { $$sudo apt-get update -q && $$sudo apt-get install -y -q chromium chromium-driver; } \
		|| echo "make browser: could not install chromium; the browser test will skip"; \
	fi

test: setup browser
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check eep tests bench

demo: setup
	$(BIN)/eep demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
