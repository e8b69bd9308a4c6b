# The two commands a newcomer needs:  make book  and  make test.
# Everything else here is for writing chapters.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU build of PyTorch: on the machines this book is tested on, pip takes it from local
# disk. Elsewhere on Linux, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to
# avoid a multi-GB CUDA download. The package itself only asks for a range.
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?=
CHAPTERS ?=
export PYTHONHASHSEED = 0

NBVAL = --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 1200
PYTEST_WORKERS ?= 2
# The chapters are executed with the machine's own CPU kernels (tools/execute.py records
# which). The second pass of make test runs them again on other kernels, standing in for
# another reader's CPU: PyTorch's portable kernels, MKL without AVX, OpenBLAS for an older
# core. An output that only one kind of CPU prints fails here, on the author's machine.
OTHER_KERNELS = ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OPENBLAS_CORETYPE=Sandybridge

.PHONY: book test test-other-kernels install-book install-test install-grading site lab execute chapter-times sync student assignment grade serve clean

# ---- the two commands ------------------------------------------------------------------

book: install-book site  ## build the site from the executed chapters and say where it is
	@$(BIN)/python tools/open_site.py _build/html/index.html

test: install-test  ## install what the tests need, then run the whole suite
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(NBVAL) tests chapters
	$(MAKE) --no-print-directory test-other-kernels

test-other-kernels: install-test  ## the chapters again, on CPU kernels other than those that executed them
	$(OTHER_KERNELS) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(NBVAL) chapters

# ---- installation ------------------------------------------------------------------------

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	@touch $@

$(VENV)/.book: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[book]"
	@touch $@

$(VENV)/.grading: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[grading]"
	@touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[book,test,reference,grading]"
	@bash tools/ensure_chromium.sh
	@touch $@

install-book: $(VENV)/.book
install-test: $(VENV)/.test
install-grading: $(VENV)/.grading

# ---- the site ----------------------------------------------------------------------------

site: install-book
	$(BIN)/python tools/sync_links.py --check
	$(BIN)/jupyter-book build . -W --keep-going --path-output .

serve: site  ## serve the built site on http://127.0.0.1:8000
	$(BIN)/python -m http.server 8000 --bind 127.0.0.1 --directory _build/html

lab: install-book  ## open the chapters in JupyterLab
	$(BIN)/jupyter lab chapters

# ---- writing chapters --------------------------------------------------------------------

execute: install-test  ## re-execute chapters in place: make execute [CHAPTERS="chapters/02_attention.md"]
	$(BIN)/python tools/execute.py $(CHAPTERS)

chapter-times: install-test  ## how long each chapter takes to run here (writes nothing)
	$(BIN)/python tools/execute.py --time $(CHAPTERS)

sync: install-book  ## write repository.url from _config.yml into every chapter
	$(BIN)/python tools/sync_links.py

student: install-book  ## student copies without solutions: make student CHAPTERS="chapters/02_attention.ipynb"
	$(BIN)/python -m companion.student $(or $(CHAPTERS),chapters/*.ipynb) --out student

assignment: install-grading  ## graded assignments for otter-grader: make assignment CHAPTERS="chapters/02_attention.ipynb"
	$(BIN)/python -m companion.assignment make $(or $(CHAPTERS),chapters/*.ipynb) --out assignments

grade: install-grading  ## grade a folder of notebooks: make grade ASSIGNMENT=assignments/02_attention SUBMISSIONS=submitted/
	$(BIN)/python -m companion.assignment grade $(ASSIGNMENT) $(SUBMISSIONS) $(if $(OUT),--out $(OUT))

clean:
	rm -rf _build student assignments grades .pytest_cache
