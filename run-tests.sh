#!/usr/bin/env bash
# Run Willi's whole test suite on this machine, installing what it needs.
#
#   ./run-tests.sh            # everything: lint, unit, end-to-end, MariaDB, Postfix, release
#   ./run-tests.sh -k dialog  # extra arguments go to pytest
#
# As root on Debian it installs the Debian packages the tests use (postfix,
# swaks, openssl, mariadb-server when no MariaDB answers on 127.0.0.1:3306)
# and starts MariaDB if it is not running. Python packages come from
# setup.py's [test] extra. Outside CI, tests whose service is missing are
# skipped with the reason; with CI set they fail instead.
set -euo pipefail
cd "$(dirname "$0")"

log() { printf '== %s\n' "$*"; }

mysql_up() { python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 3306)) == 0 else 1)
PY
}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  command -v postfix >/dev/null || need+=(postfix)
  command -v swaks >/dev/null || need+=(swaks)
  command -v openssl >/dev/null || need+=(openssl)
  command -v smtp-source >/dev/null || need+=(postfix)
  if ! mysql_up && ! command -v mariadbd >/dev/null; then need+=(mariadb-server); fi
  if [ ${#need[@]} -gt 0 ]; then
    log "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  if ! mysql_up; then
    log "starting MariaDB"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
    for _ in $(seq 1 60); do mysql_up && break; sleep 0.5; done
    # A fresh Debian MariaDB lets root in only over the socket; the tests log in over TCP.
    mariadb -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('')" \
      2>/dev/null || true
    mariadb -e "CREATE DATABASE IF NOT EXISTS test" 2>/dev/null || true
  fi
fi

log "installing Python packages (willi and its [test] extra)"
python3 -m pip install -q --disable-pip-version-check -e '.[test]'

log "ruff"
python3 -m ruff check .

log "pytest"
set +e
python3 -m pytest "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, never a pass.
exit $status
