# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing has to be installed by hand.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ART    ?= artifacts
PORT   ?= 8000
SYNTH  ?= --users 2000 --items 1000 --interactions 60000

.PHONY: demo test venv data train index serve lint clean image-check

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

venv: $(VENV)/.installed

# --- make demo: synthetic data -> train -> index -> serve on :$(PORT) -------------------------
$(ART)/data/schema.json: | $(VENV)/.installed
	$(VENV)/bin/trainer prepare synthetic --out $(ART)/data $(SYNTH)

data: $(ART)/data/schema.json

train: data
	$(VENV)/bin/trainer fit --data $(ART)/data --out $(ART)/models

index: $(VENV)/.installed
	$(VENV)/bin/indexer rebuild --model $(ART)/models --data $(ART)/data --out $(ART)/index

serve: $(VENV)/.installed
	SERVICE_INDEX_ROOT=$(ART)/index $(VENV)/bin/uvicorn service.app:app --host 127.0.0.1 --port $(PORT)

demo: train index serve

# --- make test: the whole suite, with a real Redis ------------------------------------------
test: $(VENV)/.installed
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (tests use a real Redis)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }
	$(PY) -m pytest -q

# --- make image-check: build both Dockerfile targets and run the compose stack inside them ------
# Minutes, root, podman (installed by the tool); not in CI. See .ci/image_stack.py.
IMAGE_CHECK ?= ../shared/tools/image-check.sh

image-check: $(VENV)/.installed
	IMAGE_CHECK=$(IMAGE_CHECK) $(PY) .ci/image_stack.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(ART)
