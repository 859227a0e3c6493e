#!/bin/sh
# Build dist/willi-<version>.tar.gz: install.sh, the example configuration
# and CSV, the systemd unit, the manual page, the README and wheels/ with
# Willi and every dependency (the metrics extra's prometheus_client too), so
# that install.sh needs no network.
#
# Usage: packaging/release.sh [DIST_DIR]      (what `make release` runs)
# Needs network access to PyPI (or a pip cache / PIP_FIND_LINKS) to fetch the
# dependencies' wheels. Environment: PYTHON (default python3).
set -eu

PYTHON=${PYTHON:-python3}
DIST=${1:-dist}
case $DIST in /*) ;; *) DIST=$(pwd)/$DIST ;; esac
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' willi/__init__.py)
[ -n "$VERSION" ] || { echo "release: no __version__ in willi/__init__.py" >&2; exit 1; }
NAME=willi-$VERSION
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT INT TERM
STAGE=$WORK/$NAME
mkdir -p "$STAGE/packaging" "$STAGE/wheels" "$WORK/src" "$WORK/pure"

# Build Willi's wheel from a copy holding only what setup.py packages, so the
# checkout stays clean and stray files never end up in the wheel.
cp setup.py "$WORK/src/"
[ -f README.md ] && cp README.md "$WORK/src/"
tar -cf - --exclude=__pycache__ --exclude='*.pyc' willi | tar -xf - -C "$WORK/src"
# With the metrics extra: install.sh installs willi[metrics], offline.
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --use-pep517 --wheel-dir "$STAGE/wheels" "$WORK/src[metrics]"
ls "$STAGE"/wheels/prometheus_client-*.whl >/dev/null 2>&1 \
    || { echo "release: no prometheus_client wheel for willi[metrics]" >&2; exit 1; }

# Prefer pure-Python wheels: the tarball then installs on any CPU and any
# supported Python. mysql-connector-python publishes a platform wheel (with
# an optional C extension Willi does not use: it asks for use_pure=True) and
# a pure one; take the pure one of the same version. A dependency without a
# pure wheel stays platform-specific, which is reported.
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
for whl in "$STAGE"/wheels/*.whl; do
    file=${whl##*/}
    case $file in *-none-any.whl) continue ;; esac
    dist=${file%%-*}
    rest=${file#*-}
    version=${rest%%-*}
    if "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform any --implementation py --python-version "$PYVER" \
            --dest "$WORK/pure" "$dist==$version" 2>/dev/null \
        && ls "$WORK/pure"/*-none-any.whl >/dev/null 2>&1; then
        rm -f "$whl"
        mv "$WORK/pure"/*-none-any.whl "$STAGE/wheels/"
        echo "release: $dist $version: using the pure-Python wheel"
    else
        echo "release: warning: $file is platform-specific; the tarball installs only on the same CPU and Python"
    fi
    rm -f "$WORK/pure"/*
done

cp install.sh "$STAGE/"
chmod 0755 "$STAGE/install.sh"
cp willi.toml.example routes.csv.example "$STAGE/"
cp packaging/willi.service packaging/haproxy.cfg.example "$STAGE/packaging/"
sed "s/^\.TH WILLI 8 \"\" \"Willi\"/.TH WILLI 8 \"\" \"Willi $VERSION\"/" packaging/willi.8 > "$STAGE/packaging/willi.8"
grep -q "^\.TH WILLI 8 \"\" \"Willi $VERSION\"" "$STAGE/packaging/willi.8" \
    || { echo "release: packaging/willi.8 has no .TH line to put the version in" >&2; exit 1; }
if [ -f README.md ]; then
    cp README.md "$STAGE/"
else
    echo "release: warning: README.md is missing; the tarball has no README" >&2
fi
echo "$VERSION" > "$STAGE/VERSION"

mkdir -p "$DIST"
tar -C "$WORK" --owner=0 --group=0 --numeric-owner --sort=name -czf "$DIST/$NAME.tar.gz" "$NAME"
echo "release: built $DIST/$NAME.tar.gz"
for whl in "$STAGE"/wheels/*.whl; do
    echo "release:   wheels/${whl##*/}"
done
