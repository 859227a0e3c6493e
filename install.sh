#!/bin/sh
# install.sh: install or upgrade Willi from an unpacked release tarball.
#
#   tar xzf willi-VERSION.tar.gz && cd willi-VERSION && ./install.sh
#
# Run as root. Needs python3 (3.10 or newer, with venv: on Debian the
# python3-venv package) and no network: everything comes from wheels/.
#
#   --prefix DIR     install into DIR instead of /opt/willi
#   --no-systemd     do not install the systemd unit
#   --user NAME      run Willi as NAME (default willi; created when missing)
#   --python PATH    the Python for the virtual environment (default python3)
#
# What it does (and prints):
#   - creates the system user and group `willi` unless they exist;
#   - builds a new virtual environment PREFIX/venvs/willi-VERSION-STAMP from
#     the wheels, then points PREFIX/venv at it (one atomic rename), so a
#     failed upgrade leaves the running installation untouched; the previous
#     environment is kept, older ones are removed;
#   - PREFIX/bin/willi -> PREFIX/venv/bin/willi;
#   - PREFIX/etc/ (root:willi 0750): willi.toml.example and routes.csv.example
#     are refreshed; willi.toml and routes.csv are created from them only when
#     absent, never overwritten;
#   - with systemd: installs /etc/systemd/system/willi.service. A fresh
#     install is NOT enabled or started: Willi starts once configured, i.e.
#     once willi.toml differs from what install.sh generated. An upgrade of a
#     configured install enables the unit and restarts it if it was running,
#     after `willi --check` accepted the kept configuration.
set -eu
umask 022
# Install exactly the tarball's wheels: ignore pip settings from the
# environment and pip.conf (other indexes, find-links, constraints).
for var in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$var"
done
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

PREFIX=/opt/willi
SYSTEMD=auto
WILLI_USER=willi
PYTHON=python3
UNIT_DIR=${WILLI_UNIT_DIR:-/etc/systemd/system}

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,17s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=no; shift ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; WILLI_USER=$2; shift 2 ;;
        --user=*) WILLI_USER=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path, not $PREFIX" ;;
esac
PREFIX=${PREFIX%/}
case $PREFIX in
    *[!A-Za-z0-9/._-]*) die "--prefix may hold only letters, digits and / . _ -: $PREFIX" ;;
esac
case $WILLI_USER in
    ''|-*|*[!A-Za-z0-9._-]*) die "not a valid user name: $WILLI_USER" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run me as root (I create a user and install into $PREFIX)"
HERE=$(cd "$(dirname "$0")" && pwd)
[ -d "$HERE/wheels" ] && [ -f "$HERE/VERSION" ] \
    || die "run me from the unpacked release tarball: no wheels/ or VERSION beside me in $HERE"
VERSION=$(cat "$HERE/VERSION")
ETC=$PREFIX/etc

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || die "$PYTHON is too old: Willi needs Python 3.10 or newer"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot create virtual environments; on Debian: apt-get install python3-venv"

say "installing willi $VERSION into $PREFIX"

# -- the user --------------------------------------------------------------
if getent passwd "$WILLI_USER" >/dev/null 2>&1; then
    say "user $WILLI_USER exists"
else
    NOLOGIN=/usr/sbin/nologin
    [ -x "$NOLOGIN" ] || NOLOGIN=/sbin/nologin
    [ -x "$NOLOGIN" ] || NOLOGIN=/bin/false
    if getent group "$WILLI_USER" >/dev/null 2>&1; then
        useradd --system --gid "$WILLI_USER" --home-dir "$PREFIX" --no-create-home \
            --shell "$NOLOGIN" --comment "Willi SMTP proxy" "$WILLI_USER"
    else
        useradd --system --user-group --home-dir "$PREFIX" --no-create-home \
            --shell "$NOLOGIN" --comment "Willi SMTP proxy" "$WILLI_USER"
    fi
    say "created system user $WILLI_USER (no login shell, home $PREFIX)"
fi
WILLI_GROUP=$(id -gn "$WILLI_USER")

install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/bin" "$PREFIX/venvs"
install -d -m 0750 -o root -g "$WILLI_GROUP" "$ETC"

# -- the virtual environment -----------------------------------------------
STAMP=$(date +%Y%m%d%H%M%S)-$$
NAME=willi-$VERSION-$STAMP
NEW=$PREFIX/venvs/$NAME
rm -rf "$NEW"
"$PYTHON" -m venv "$NEW"
if ! "$NEW/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheels" \
        --disable-pip-version-check --no-cache-dir "willi==$VERSION"; then
    rm -rf "$NEW"
    die "pip could not install willi $VERSION from $HERE/wheels; nothing was changed"
fi
"$NEW/bin/willi" -V >/dev/null || { rm -rf "$NEW"; die "the new willi does not run; nothing was changed"; }
say "built virtual environment $NEW ($("$NEW/bin/python" -V 2>&1))"

PREVIOUS=""
if [ -L "$PREFIX/venv" ]; then
    PREVIOUS=$(readlink "$PREFIX/venv")
    PREVIOUS=${PREVIOUS##*/}
elif [ -e "$PREFIX/venv" ]; then
    PREVIOUS=legacy-$STAMP
    mv "$PREFIX/venv" "$PREFIX/venvs/$PREVIOUS"
fi
ln -s "venvs/$NAME" "$PREFIX/venv.new.$$"
mv -T "$PREFIX/venv.new.$$" "$PREFIX/venv"
ln -sfn ../venv/bin/willi "$PREFIX/bin/willi"
if [ -n "$PREVIOUS" ]; then
    say "switched $PREFIX/venv from $PREVIOUS to $NAME (the previous one is kept for a rollback)"
else
    say "$PREFIX/venv -> venvs/$NAME"
fi
for dir in "$PREFIX"/venvs/*; do
    [ -e "$dir" ] || continue
    case ${dir##*/} in
        "$NAME"|"$PREVIOUS") ;;
        *) rm -rf "$dir"; say "removed the old environment $dir" ;;
    esac
done
say "command: $PREFIX/bin/willi"

# -- configuration ---------------------------------------------------------
install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/willi.toml.example" "$ETC/willi.toml.example"
install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/routes.csv.example" "$ETC/routes.csv.example"
[ -f "$HERE/README.md" ] && install -m 0644 -o root -g root "$HERE/README.md" "$PREFIX/README.md"

# The installed default: the example with the user, the pidfile and the
# installed CSV filled in (only in the top-level part, before any table).
generate_config() {
    awk -v user="$WILLI_USER" -v group="$WILLI_GROUP" -v etc="$ETC" -v version="$VERSION" '
        BEGIN {
            print "# Installed by install.sh (willi " version "), which never overwrites this file;"
            print "# after an upgrade compare it with willi.toml.example beside it."
            print "# Willi is not started until you have configured it: set listen (e.g."
            print "# [\":25\", \"[::]:25\"]), domain and the mappings, check with"
            print "#   willi -c " etc "/willi.toml --check"
            print "# then start it (see README.md). Reload after edits: kill -HUP the pid."
            print ""
        }
        /^\[/ { table = 1 }
        !table && !u && /^#[ \t]*user[ \t]*=/ { print "user = \"" user "\""; u = 1; next }
        !table && !g && /^#[ \t]*group[ \t]*=/ { print "group = \"" group "\""; g = 1; next }
        !table && !p && /^#[ \t]*pidfile[ \t]*=/ { print "pidfile = \"/run/willi/willi.pid\""; p = 1; next }
        {
            gsub(/"routes\.csv\.example"/, "\"" etc "/routes.csv\"")
            gsub(/\/opt\/willi\/etc/, etc)
            print
        }
        END { if (!u || !g || !p) exit 3 }
    ' "$HERE/willi.toml.example"
}

DEFAULT_SUM=$ETC/.willi.toml.installed.sha256
if [ -e "$ETC/willi.toml" ]; then
    say "kept $ETC/willi.toml (never overwritten)"
else
    generate_config > "$ETC/willi.toml.new" \
        || { rm -f "$ETC/willi.toml.new"; die "cannot adapt willi.toml.example (no user/group/pidfile lines)"; }
    chown root:"$WILLI_GROUP" "$ETC/willi.toml.new"
    chmod 0640 "$ETC/willi.toml.new"
    mv "$ETC/willi.toml.new" "$ETC/willi.toml"
    sha256sum "$ETC/willi.toml" | cut -d' ' -f1 > "$DEFAULT_SUM"
    chmod 0640 "$DEFAULT_SUM"
    say "created $ETC/willi.toml (root:$WILLI_GROUP 0640, user = $WILLI_USER)"
fi
if [ -e "$ETC/routes.csv" ]; then
    say "kept $ETC/routes.csv"
else
    install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/routes.csv.example" "$ETC/routes.csv"
    say "created $ETC/routes.csv from the example"
fi

# Configured = willi.toml is not the untouched default generated above.
CONFIGURED=yes
if [ -f "$DEFAULT_SUM" ] && [ "$(sha256sum "$ETC/willi.toml" | cut -d' ' -f1)" = "$(cat "$DEFAULT_SUM")" ]; then
    CONFIGURED=no
fi
CHECK_OK=yes
if [ "$CONFIGURED" = yes ]; then
    if "$PREFIX/bin/willi" -c "$ETC/willi.toml" --check >/dev/null 2>"$PREFIX/venvs/check.err"; then
        say "willi --check accepts $ETC/willi.toml"
    else
        CHECK_OK=no
        say "WARNING: willi --check rejects $ETC/willi.toml:"
        sed 's/^/install.sh:   /' "$PREFIX/venvs/check.err"
    fi
    rm -f "$PREFIX/venvs/check.err"
fi

# -- systemd ---------------------------------------------------------------
if [ "$SYSTEMD" = auto ]; then
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        SYSTEMD=yes
    else
        SYSTEMD=no
        say "systemd is not running here: no unit installed"
    fi
fi
if [ "$SYSTEMD" = yes ]; then
    sed "s#/opt/willi#$PREFIX#g" "$HERE/packaging/willi.service" > "$UNIT_DIR/willi.service.new"
    chmod 0644 "$UNIT_DIR/willi.service.new"
    mv "$UNIT_DIR/willi.service.new" "$UNIT_DIR/willi.service"
    systemctl daemon-reload
    say "installed $UNIT_DIR/willi.service"
fi

echo
if [ "$CONFIGURED" = no ]; then
    say "Willi $VERSION is installed but NOT started: it is not configured yet."
    say "  1. edit $ETC/willi.toml (listen, domain, mappings) and $ETC/routes.csv"
    say "  2. check:  $PREFIX/bin/willi -c $ETC/willi.toml --check"
    if [ "$SYSTEMD" = yes ]; then
        say "  3. start:  systemctl enable --now willi"
    else
        say "  3. start:  $PREFIX/bin/willi -c $ETC/willi.toml   (detaches; add it to your boot scripts)"
    fi
elif [ "$SYSTEMD" = yes ]; then
    systemctl enable --quiet willi
    say "enabled willi.service (starts at boot)"
    if systemctl is-active --quiet willi; then
        if [ "$CHECK_OK" = yes ]; then
            systemctl restart willi
            say "restarted willi: it now runs $VERSION"
        else
            say "NOT restarted: fix the configuration, then: systemctl restart willi"
        fi
    else
        say "willi is not running; start it: systemctl start willi"
    fi
else
    say "Willi $VERSION is installed. A running willi keeps the old version until restarted:"
    say "  stop:   kill -TERM \$(cat /run/willi/willi.pid)   (or the pidfile set in willi.toml)"
    say "  start:  $PREFIX/bin/willi -c $ETC/willi.toml"
fi
