# Two commands for a fresh machine: `make demo` and `make test`.
# Both install from requirements.lock (every package at an exact version), never from
# pyproject.toml's ranges alone: a new upload to the registry cannot change a fresh venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LOCK    := requirements.lock

.PHONY: demo demo-one-step test bench lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fada_lightning.demo

demo-one-step: $(STAMP)   # TurboTalk's stages: teacher -> DMD (4 NFE) -> one step (1 NFE)
	$(BIN)/python -m fada_lightning.demo --one-step

# The synthetic world's evaluation net, trained once here on every core (127 s on a fresh clone): left to the tests,
# one xdist worker would train it on one thread while the other waits for it.
WORLD_NET := data/extractors/world_net-seed0-32px.pt
$(WORLD_NET): | $(STAMP)
	$(BIN)/python -c "from fada_lightning.metrics.synthetic import world_net; world_net()"

# `make test`: the suite without the end-to-end runs marked slow; `make test SLOW=1`: all of it, as CI runs it.
# The 10 slowest tests are listed, to keep the suite inside its 15 minutes. Worksteal: a worker that
# runs out takes tests queued on the other, so one long test at the end does not leave a core idle.
test: $(STAMP) $(WORLD_NET)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal --durations 10 -q $(if $(SLOW),,-m "not slow")

bench: $(STAMP)
	$(BIN)/python bench/data.py

# Re-resolve pyproject.toml's ranges (with the dev extra) against the registry, for every
# platform and Python >= 3.10; run after editing the dependencies, then commit both files.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 \
		--custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf data runs outputs lightning_logs
