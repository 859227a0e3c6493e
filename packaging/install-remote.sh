#!/bin/sh
# Install the release tarball on another host: what `make install
# TARGET_HOST=host` runs after `make release`.
#
# Usage: packaging/install-remote.sh [DIST_DIR]      (default dist)
#
# Streams DIST_DIR/willi-VERSION.tar.gz over one ssh connection into a new
# temporary directory on the host, runs its install.sh there with
# INSTALL_ARGS, prints everything install.sh printed (each line prefixed
# with "HOST: "), removes the temporary directory, and exits non-zero when
# any of that failed (with install.sh's status when install.sh failed, 255
# when ssh did).
#
# Environment:
#   TARGET_HOST    the host (required)
#   TARGET_USER    the ssh login (default root); another user runs install.sh
#                  with `sudo -n`, so needs sudo without a password there
#   SSH_PORT       default 22
#   SSH_OPTS       more ssh options, split at blanks (e.g. -i ~/.ssh/deploy)
#   INSTALL_ARGS   install.sh's options, split at blanks by the remote shell
#                  (e.g. --no-systemd --python /usr/bin/python3)
set -eu

DIST=${1:-dist}
case $DIST in /*) ;; *) DIST=$(pwd)/$DIST ;; esac
cd "$(dirname "$0")/.."

me=install-remote
[ -n "${TARGET_HOST:-}" ] || { echo "$me: TARGET_HOST is not set (the host to install on)" >&2; exit 2; }
TARGET_USER=${TARGET_USER:-root}
SSH_PORT=${SSH_PORT:-22}
SSH_OPTS=${SSH_OPTS:-}
INSTALL_ARGS=${INSTALL_ARGS:-}

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' willi/__init__.py)
NAME=willi-$VERSION
TARBALL=$DIST/$NAME.tar.gz
[ -f "$TARBALL" ] || { echo "$me: no $TARBALL; build it first: make release" >&2; exit 1; }

# Runs on the host under `sh -c`, with the tarball on its standard input,
# the release's name as $1 and INSTALL_ARGS after it. It never reads a
# terminal. (Single quotes: it expands on the host, not here.)
# shellcheck disable=SC2016
REMOTE_SCRIPT='set -eu
name=$1
shift
tmp=$(mktemp -d "${TMPDIR:-/tmp}/willi-install.XXXXXX")
trap "rm -rf \"\$tmp\"; echo \"install-remote: removed \$tmp\"" EXIT
trap "exit 129" HUP INT TERM
tar -xzf - -C "$tmp"
echo "install-remote: unpacked $name.tar.gz in $tmp"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
$sudo sh "$tmp/$name/install.sh" "$@" </dev/null'

# One word for the remote shell, whatever the script holds.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

STATUS=$(mktemp)
trap 'rm -f "$STATUS"' EXIT
echo "$me: copying $NAME.tar.gz to $TARGET_USER@$TARGET_HOST (port $SSH_PORT), then: install.sh $INSTALL_ARGS"
# SSH_OPTS is split at blanks on purpose.
# shellcheck disable=SC2086
{
    rc=0
    ssh -p "$SSH_PORT" $SSH_OPTS -- "$TARGET_USER@$TARGET_HOST" \
        "sh -c $(quote "$REMOTE_SCRIPT") $me $NAME $INSTALL_ARGS" <"$TARBALL" 2>&1 || rc=$?
    echo "$rc" >"$STATUS"
} | awk -v host="$TARGET_HOST" '{ print host ": " $0; fflush() }'
rc=$(cat "$STATUS")
case $rc in
    0) echo "$me: installed $NAME on $TARGET_HOST" ;;
    255) echo "$me: error: ssh to $TARGET_USER@$TARGET_HOST (port $SSH_PORT) failed (exit 255: connection, authentication, or the remote side was cut off)" >&2 ;;
    *) echo "$me: error: install.sh on $TARGET_HOST failed (exit $rc)" >&2 ;;
esac
exit "$rc"
