# make release   build dist/willi-<version>.tar.gz (DIST=dir to build elsewhere)
# make test      the whole test suite
# make lint      ruff
PYTHON ?= python3
DIST ?= dist

.PHONY: release test lint clean

release:
	PYTHON=$(PYTHON) sh packaging/release.sh $(DIST)

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check .

clean:
	rm -rf dist build *.egg-info
