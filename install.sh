#!/bin/sh
# install.sh: install or upgrade Willi from an unpacked release tarball.
#
#   tar xzf willi-VERSION.tar.gz && cd willi-VERSION && ./install.sh
#
# Run as root. Needs Python 3.11 or newer with venv (Debian 12: apt-get
# install python3 python3-venv) and no network: everything comes from wheels/.
#
#   --prefix DIR     install into DIR instead of /opt/willi
#   --no-systemd     do not install the systemd unit
#   --user NAME      run Willi as NAME (default willi; created when missing)
#   --python PATH    the Python for the virtual environment (default: python3
#                    from root's PATH)
#   --print-unit     print the systemd unit this installation gets, then exit
#
# What it does (and prints):
#   - checks that the service user can run the chosen Python. Willi starts as
#     root and then runs as that user, still importing parts of the standard
#     library (encodings.idna, ssl); a Python the user cannot read, such as a
#     pyenv interpreter under /root (mode 0700), would fail only after the
#     start (LookupError: unknown encoding: idna). install.sh runs a probe as
#     the user first and, when it fails, stops and changes nothing (a user it
#     has just created is removed again); the fix: --python /usr/bin/python3;
#   - creates the system user and group `willi` unless they exist;
#   - builds a new virtual environment PREFIX/venvs/willi-VERSION-STAMP from
#     the wheels (willi[metrics]: with prometheus_client), then points
#     PREFIX/venv at it (one atomic rename), so a failed upgrade leaves the
#     running installation untouched; the previous environment is kept,
#     older ones are removed;
#   - PREFIX/bin/willi -> PREFIX/venv/bin/willi;
#   - the manual page PREFIX/share/man/man8/willi.8; with the default prefix
#     also the link /usr/local/share/man/man8/willi.8, so `man willi` works;
#   - PREFIX/etc/ (root:willi 0750): willi.toml.example and routes.csv.example
#     are refreshed; willi.toml and routes.csv are created from them only when
#     absent, never overwritten;
#   - the pidfile in the generated willi.toml: with the default prefix
#     /run/willi/willi.pid (systemd's RuntimeDirectory=willi creates
#     /run/willi; without systemd Willi creates it itself); with any other
#     --prefix PREFIX/run/willi.pid, PREFIX/run owned by the user, so that
#     installations side by side never share a pidfile. Except for the user
#     and the unit, an install with --prefix writes nothing outside PREFIX;
#   - with systemd: installs /etc/systemd/system/willi.service. Its PIDFile=
#     is the pidfile willi.toml names (a kept willi.toml's on an upgrade), and
#     RuntimeDirectory=willi stays only when that is in /run/willi.
#     A fresh install is NOT enabled or started: Willi starts once configured, i.e.
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

DEFAULT_PREFIX=/opt/willi
PREFIX=$DEFAULT_PREFIX
PYTHON_MIN=3.11
SYSTEMD=auto
PRINT_UNIT=no
WILLI_USER=willi
PYTHON=python3
PYTHON_FROM="python3 from root's PATH"
UNIT_DIR=${WILLI_UNIT_DIR:-/etc/systemd/system}

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=no; shift ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; WILLI_USER=$2; shift 2 ;;
        --user=*) WILLI_USER=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; PYTHON_FROM="--python $2"; shift 2 ;;
        --python=*) PYTHON=${1#*=}; PYTHON_FROM="--python $PYTHON"; shift ;;
        --print-unit) PRINT_UNIT=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path, not $PREFIX" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "--prefix / is not an installation directory"
case $PREFIX in
    *[!A-Za-z0-9/._-]*) die "--prefix may hold only letters, digits and / . _ -: $PREFIX" ;;
esac
case $WILLI_USER in
    ''|-*|*[!A-Za-z0-9._-]*) die "not a valid user name: $WILLI_USER" ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
ETC=$PREFIX/etc
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then
    RUN_DIR=/run/willi
else
    RUN_DIR=$PREFIX/run
fi
PIDFILE=$RUN_DIR/willi.pid

# The pidfile willi.toml names (Willi's default when it names none; relative
# names are relative to the file's directory), or $PIDFILE when there is no
# readable willi.toml. $1: a Python with tomllib.
configured_pidfile() {
    found=""
    if [ -r "$ETC/willi.toml" ]; then
        found=$("$1" -c '
import pathlib, sys, tomllib
path = pathlib.Path(sys.argv[1])
try:
    value = tomllib.loads(path.read_text(encoding="utf-8")).get("pidfile", "/run/willi/willi.pid")
except (OSError, ValueError):
    sys.exit(0)
if isinstance(value, str) and value and "\n" not in value:
    print(path.parent / value)
' "$ETC/willi.toml" 2>/dev/null) || found=""
    fi
    echo "${found:-$PIDFILE}"
}

# The systemd unit for this prefix and pidfile ($1): PIDFile= names it;
# RuntimeDirectory=willi applies only to /run/willi, any other directory is
# made writable instead (ProtectSystem=full would leave /usr read-only).
render_unit() {
    awk -v prefix="$PREFIX" -v pidfile="$1" -v dir="${1%/*}" '
        /^PIDFile=/ {
            print "PIDFile=" pidfile
            if (dir != "/run/willi") print "ReadWritePaths=-" dir
            next
        }
        /^RuntimeDirectory/ && dir != "/run/willi" { next }
        { gsub("/opt/willi", prefix); print }
    ' "$HERE/packaging/willi.service"
}

if [ "$PRINT_UNIT" = yes ]; then
    [ -f "$HERE/packaging/willi.service" ] || die "no packaging/willi.service beside me in $HERE"
    render_unit "$(configured_pidfile "$PYTHON")"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run me as root (I create a user and install into $PREFIX)"
[ -d "$HERE/wheels" ] && [ -f "$HERE/VERSION" ] \
    || die "run me from the unpacked release tarball: no wheels/ or VERSION beside me in $HERE"
VERSION=$(cat "$HERE/VERSION")

# -- the Python ------------------------------------------------------------
# The probe checks the version and imports what Willi needs after dropping
# privileges. It prints the interpreter that a venv made by this Python runs,
# or one line saying what is wrong (and exits 1).
PROBE='
import sys
def probe():
    need = tuple(int(part) for part in sys.argv[1].split("."))
    if sys.version_info < need:
        return "it is Python %d.%d, Willi needs %s or newer" % (sys.version_info[0], sys.version_info[1], sys.argv[1])
    for module in ("encodings.idna", "ssl", "venv", "ensurepip"):
        try:
            __import__(module)
        except Exception as exc:
            return "it cannot import %s (%s: %s)" % (module, type(exc).__name__, exc)
    return getattr(sys, "_base_executable", "") or sys.executable
answer = probe()
print(answer)
sys.exit(not answer.startswith("/"))
'
PYTHON_HINT="Debian 12: apt-get install python3 python3-venv, then --python /usr/bin/python3"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python $PYTHON_MIN or newer ($PYTHON_HINT)"
REAL_PYTHON=$("$PYTHON" -c "$PROBE" "$PYTHON_MIN") \
    || die "$PYTHON cannot run Willi: ${REAL_PYTHON:-its probe failed, see above} ($PYTHON_HINT)"
case $REAL_PYTHON in
    /*) ;;
    *) die "$PYTHON does not say where its interpreter is ($REAL_PYTHON); give an absolute --python" ;;
esac

# Runs "$@" the way the daemon runs after its start: as the service user with
# its groups (initgroups), in /, with a service manager's bare environment.
# setpriv still holds root's capabilities when it calls exec, so a shell that
# runs as the user does the exec: a program the user may not execute fails.
# shellcheck disable=SC2016
run_as_service_user() {
    if command -v setpriv >/dev/null 2>&1; then
        (cd / && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            setpriv --reuid="$WILLI_USER" --regid="$WILLI_GROUP" --init-groups -- \
            /bin/sh -c 'exec "$0" "$@"' "$@")
    else
        (cd / && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            su -s /bin/sh -c 'exec "$0" "$@"' "$WILLI_USER" "$@")
    fi
}

say "installing willi $VERSION into $PREFIX"

# -- the user --------------------------------------------------------------
CREATED_USER=no
KEPT_GROUP_GID=""
if getent passwd "$WILLI_USER" >/dev/null 2>&1; then
    say "user $WILLI_USER exists"
else
    NOLOGIN=/usr/sbin/nologin
    [ -x "$NOLOGIN" ] || NOLOGIN=/sbin/nologin
    [ -x "$NOLOGIN" ] || NOLOGIN=/bin/false
    if getent group "$WILLI_USER" >/dev/null 2>&1; then
        KEPT_GROUP_GID=$(getent group "$WILLI_USER" | cut -d: -f3)
        useradd --system --gid "$WILLI_USER" --home-dir "$PREFIX" --no-create-home \
            --shell "$NOLOGIN" --comment "Willi SMTP proxy" "$WILLI_USER"
    else
        useradd --system --user-group --home-dir "$PREFIX" --no-create-home \
            --shell "$NOLOGIN" --comment "Willi SMTP proxy" "$WILLI_USER"
    fi
    CREATED_USER=yes
    say "created system user $WILLI_USER (no login shell, home $PREFIX)"
fi
WILLI_GROUP=$(id -gn "$WILLI_USER")

# Undo the user this run created (userdel also takes a group of the same name
# with it, which is put back when it was there before).
remove_created_user() {
    [ "$CREATED_USER" = yes ] || return 0
    userdel "$WILLI_USER" >/dev/null 2>&1 || true
    if getent group "$WILLI_USER" >/dev/null 2>&1; then
        [ -n "$KEPT_GROUP_GID" ] || groupdel "$WILLI_USER" >/dev/null 2>&1 || true
    elif [ -n "$KEPT_GROUP_GID" ]; then
        groupadd --gid "$KEPT_GROUP_GID" "$WILLI_USER"
    fi
    say "removed the user $WILLI_USER created above"
}

if ! USER_PROBE=$(run_as_service_user "$REAL_PYTHON" -c "$PROBE" "$PYTHON_MIN" 2>&1); then
    remove_created_user
    die "the service user $WILLI_USER cannot run $REAL_PYTHON ($PYTHON_FROM): \
$(echo "$USER_PROBE" | tail -n 1 | sed 's/^.*: [0-9]*: exec: //'). Willi starts as root and then runs as $WILLI_USER, so it would \
fail only after the start. Use a Python every user can run: --python /usr/bin/python3 \
(Debian 12: apt-get install python3 python3-venv). Nothing was changed"
fi
say "$WILLI_USER can run $REAL_PYTHON ($("$REAL_PYTHON" -V 2>&1))"

install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/bin" "$PREFIX/venvs"
install -d -m 0750 -o root -g "$WILLI_GROUP" "$ETC"
if [ "$RUN_DIR" != /run/willi ]; then
    install -d -m 0755 -o "$WILLI_USER" -g "$WILLI_GROUP" "$RUN_DIR"
fi

# -- the virtual environment -----------------------------------------------
STAMP=$(date +%Y%m%d%H%M%S)-$$
NAME=willi-$VERSION-$STAMP
NEW=$PREFIX/venvs/$NAME
rm -rf "$NEW"
"$REAL_PYTHON" -m venv "$NEW"
if ! "$NEW/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheels" \
        --disable-pip-version-check --no-cache-dir "willi[metrics]==$VERSION"; then
    rm -rf "$NEW"
    die "pip could not install willi[metrics] $VERSION from $HERE/wheels; nothing was changed"
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

# -- the manual page -------------------------------------------------------
MAN8=$PREFIX/share/man/man8
install -d -m 0755 -o root -g root "$PREFIX/share" "$PREFIX/share/man" "$MAN8"
install -m 0644 -o root -g root "$HERE/packaging/willi.8" "$MAN8/willi.8"
say "manual page: $MAN8/willi.8"
if [ "$PREFIX" = "$DEFAULT_PREFIX" ]; then
    LOCAL_MAN8=/usr/local/share/man/man8
    if [ -e "$LOCAL_MAN8/willi.8" ] && [ ! -L "$LOCAL_MAN8/willi.8" ]; then
        say "kept $LOCAL_MAN8/willi.8 (not a link of mine); read the page with: man -l $MAN8/willi.8"
    else
        install -d -m 0755 "$LOCAL_MAN8"
        ln -sfn "$MAN8/willi.8" "$LOCAL_MAN8/willi.8"
        say "linked $LOCAL_MAN8/willi.8 -> $MAN8/willi.8 (man willi)"
    fi
fi

# -- configuration ---------------------------------------------------------
install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/willi.toml.example" "$ETC/willi.toml.example"
install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/routes.csv.example" "$ETC/routes.csv.example"
[ -f "$HERE/README.md" ] && install -m 0644 -o root -g root "$HERE/README.md" "$PREFIX/README.md"

# The installed default: the example with the user, the pidfile and the
# installed CSV filled in (only in the top-level part, before any table).
generate_config() {
    awk -v user="$WILLI_USER" -v group="$WILLI_GROUP" -v etc="$ETC" -v version="$VERSION" \
        -v pidfile="$PIDFILE" '
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
        !table && !p && /^#[ \t]*pidfile[ \t]*=/ { print "pidfile = \"" pidfile "\""; p = 1; next }
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
    say "created $ETC/willi.toml (root:$WILLI_GROUP 0640, user = $WILLI_USER, pidfile = $PIDFILE)"
fi
if [ -e "$ETC/routes.csv" ]; then
    say "kept $ETC/routes.csv"
else
    install -m 0640 -o root -g "$WILLI_GROUP" "$HERE/routes.csv.example" "$ETC/routes.csv"
    say "created $ETC/routes.csv from the example"
fi
CONFIG_PIDFILE=$(configured_pidfile "$NEW/bin/python")
[ "$CONFIG_PIDFILE" = "$PIDFILE" ] || say "note: willi.toml names the pidfile $CONFIG_PIDFILE"

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
    render_unit "$CONFIG_PIDFILE" > "$UNIT_DIR/willi.service.new"
    chmod 0644 "$UNIT_DIR/willi.service.new"
    mv "$UNIT_DIR/willi.service.new" "$UNIT_DIR/willi.service"
    systemctl daemon-reload
    say "installed $UNIT_DIR/willi.service (PIDFile=$CONFIG_PIDFILE)"
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
    say "  stop:   kill -TERM \$(cat $CONFIG_PIDFILE)"
    say "  start:  $PREFIX/bin/willi -c $ETC/willi.toml"
fi
