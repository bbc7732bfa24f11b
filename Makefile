# make run   serve ./registry (a demo image is created there if it is absent)
# make test  the test suite; real clients (skopeo, ctr, podman) are used where installed
# make lint  Python >= 3.8 floor (vermin) and style (ruff)
# make bench compare against CNCF distribution and nginx (see README.md)

VENV    ?= .venv
PYTHON  ?= $(VENV)/bin/python
LISTEN  ?= 127.0.0.1:5000
PROGRAMS = embedded_registry.py download_system_images.py

.PHONY: run test lint bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/bin/pytest: | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check pytest

run:
	@test -d registry || python3 download_system_images.py --demo -d registry
	@echo "try:  curl -s http://$(LISTEN)/v2/demo/hello/tags/list"
	@echo "      skopeo inspect --tls-verify=false docker://$(LISTEN)/demo/hello:latest"
	python3 embedded_registry.py --root registry --listen $(LISTEN)

test: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/pytest)
	$(PYTHON) -m pytest -q -rs test_embedded_registry.py

lint: | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check vermin ruff
	$(VENV)/bin/vermin --no-tips --violations -t=3.8- $(PROGRAMS) bench/bench.py
	$(VENV)/bin/ruff check --isolated --select E,F,W --line-length 100 $(PROGRAMS) bench/bench.py test_embedded_registry.py

bench:
	python3 bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
