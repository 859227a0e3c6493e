# make release   build dist/willi-<version>.tar.gz (DIST=dir to build elsewhere)
# make install TARGET_HOST=host [TARGET_USER=root] [SSH_PORT=22] [SSH_OPTS=...] [INSTALL_ARGS=...]
#                build the release, copy the tarball to the host over ssh (one
#                connection), unpack it in a temporary directory there, run its
#                install.sh with INSTALL_ARGS, print everything install.sh
#                printed (each line prefixed with "host: "), remove the
#                temporary directory; exits non-zero when any step failed.
#                  TARGET_HOST   the host to install on (required)
#                  TARGET_USER   ssh login, default root (another user runs
#                                install.sh with `sudo -n`)
#                  SSH_PORT      default 22
#                  SSH_OPTS      more ssh options, e.g. SSH_OPTS="-i ~/.ssh/deploy"
#                  INSTALL_ARGS  install.sh's options (default none), e.g.
#                                INSTALL_ARGS="--python /usr/bin/python3"
#                For several hosts: for h in mx1 mx2; do make install TARGET_HOST=$h || break; done
# make test      the whole test suite
# make lint      ruff
# make mutation  the mutation check (mutmut, setup.cfg; tests/MUTATION.md), a manual
#                step of 40-60 minutes on two cores, never part of CI
PYTHON ?= python3
DIST ?= dist
TARGET_HOST ?=
TARGET_USER ?= root
SSH_PORT ?= 22
SSH_OPTS ?=
INSTALL_ARGS ?=
# Handed to packaging/install-remote.sh through the environment, so that
# their values reach it unchanged whatever quotes they hold.
export TARGET_HOST TARGET_USER SSH_PORT SSH_OPTS INSTALL_ARGS

.PHONY: release install test lint mutation clean

release:
	PYTHON=$(PYTHON) sh packaging/release.sh $(DIST)

install:
	@if [ -z "$$TARGET_HOST" ]; then \
	    echo "make install: set TARGET_HOST, the host to install on, e.g." >&2; \
	    echo "  make install TARGET_HOST=mx1.example.com [TARGET_USER=root] [SSH_PORT=22] [SSH_OPTS=...] [INSTALL_ARGS=...]" >&2; \
	    exit 2; \
	fi
	$(MAKE) --no-print-directory release PYTHON=$(PYTHON) DIST=$(DIST)
	sh packaging/install-remote.sh $(DIST)

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check .

mutation:
	$(PYTHON) -m mutmut run; $(PYTHON) -m mutmut results

clean:
	rm -rf dist build *.egg-info mutants
