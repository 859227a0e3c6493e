#!/usr/bin/env bash
# Run Willi's whole test suite on this machine.
#
#   ./run-tests.sh            # everything: lint, unit, end-to-end, MariaDB, Postfix, HAProxy, release
#   ./run-tests.sh -k dialog  # extra arguments go to pytest
#
# What this script installs and changes on the machine:
#
# * As root on Debian (apt-get present), only packages that are missing:
#   `apt-get update`, then `apt-get install --no-install-recommends` of
#   postfix (debconf answer "No configuration"), swaks, openssl, haproxy,
#   openssh-server, openssh-client, make, groff-base, curl, python3-venv,
#   and mariadb-server when no MariaDB is installed. Installing a package
#   may start its service, as Debian does.
# * As root, when MariaDB is installed but not running, it starts mariadbd
#   (as the mysql user, with the system configuration) and stops that server,
#   by the PID it started, when the tests end. A MariaDB that was already
#   running is left alone. MariaDB's users, passwords and databases are not
#   changed by this script.
# * As a normal user it installs nothing system-wide and starts nothing;
#   tests whose service is missing (or that need root) are skipped with the
#   reason.
# * It creates .venv/ in this directory (python3 -m venv, unless it exists)
#   and installs willi in editable mode with its [test] extra into it
#   (pip, from the configured package index). ruff and pytest run from it.
# * The tests themselves create and drop their own MariaDB database and user
#   (willi_test_<random>, logging in as MariaDB's root over the unix socket),
#   and start and stop private MariaDB, Postfix, HAProxy and sshd instances
#   in temporary directories on high ports on 127.0.0.1 (and ::1), and
#   throw-away system users for the install tests; nothing is left behind.
#
# With CI set (non-empty), every skip is a failure instead (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '== %s\n' "$*"; }

mariadb_up() { (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null; }
have_mariadbd() { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null; }
venv_works() { python3 -c 'import ensurepip, venv' 2>/dev/null; }

started_mariadbd=""
mariadbd_log=""
stop_started_mariadbd() {
  [ -n "$mariadbd_log" ] && rm -f "$mariadbd_log"
  [ -n "$started_mariadbd" ] || return 0
  log "stopping the MariaDB this script started (pid $started_mariadbd)"
  kill "$started_mariadbd" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$started_mariadbd" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$started_mariadbd" 2>/dev/null; then
    log "mariadbd $started_mariadbd ignored SIGTERM for 30s; killing it"
    kill -KILL "$started_mariadbd" 2>/dev/null || true
  fi
  wait "$started_mariadbd" 2>/dev/null || true
  started_mariadbd=""
}
trap stop_started_mariadbd EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  command -v postfix >/dev/null || [ -x /usr/sbin/postfix ] || need+=(postfix)
  command -v smtp-source >/dev/null || need+=(postfix)
  command -v swaks >/dev/null || need+=(swaks)
  command -v openssl >/dev/null || need+=(openssl)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null && command -v scp >/dev/null || need+=(openssh-client)
  command -v make >/dev/null || need+=(make)
  command -v groff >/dev/null || need+=(groff-base)
  command -v curl >/dev/null || need+=(curl)
  venv_works || need+=(python3-venv)
  have_mariadbd || need+=(mariadb-server)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  if have_mariadbd && ! mariadb_up; then
    log "starting MariaDB for the tests; it is stopped again at the end"
    install -d -o mysql -g mysql /run/mysqld
    mariadbd_log=$(mktemp /tmp/willi-run-tests-mariadbd.XXXXXX)
    /usr/sbin/mariadbd --user=mysql >"$mariadbd_log" 2>&1 </dev/null &
    started_mariadbd=$!
    for _ in $(seq 1 60); do
      mariadb_up && break
      kill -0 "$started_mariadbd" 2>/dev/null || break
      sleep 0.5
    done
    if ! mariadb_up; then
      log "MariaDB did not come up on 127.0.0.1:3306 (mariadbd exited, or 30s passed); its output:"
      tail -n 30 "$mariadbd_log" >&2 || true
      exit 1
    fi
  fi
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c pass 2>/dev/null; then
  if ! venv_works; then
    echo "python3 cannot create virtual environments; as root: apt-get install python3-venv" >&2
    exit 1
  fi
  log "creating .venv"
  python3 -m venv --clear .venv
fi

log "installing Python packages into .venv (willi and its [test] extra)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

log "ruff"
.venv/bin/python -m ruff check .

log "pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, never a pass.
exit $status
