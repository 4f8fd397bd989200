#!/usr/bin/env bash
# The scaling benchmark on an offline many-core node, in two steps (issue 16).
#
#   bash benchmarks/node_bench.sh wheels      # here, with the package index: build .devbench/
#   bash benchmarks/node_bench.sh run [ARGS]  # there, offline: install from it and measure
#
# "wheels" downloads the wheels of our dependencies for the node's Python (3.12, manylinux
# x86_64; override with PYVER) into .devbench/wheels, drops those the node already has
# (numpy, scipy, pandas, ...: the copy must stay small) and builds this checkout's wheel.
# Run it again after any change to the code or the dependencies.
#
# "run" installs from .devbench/wheels with no index, then runs benchmarks/scaling.py with
# ARGS (default: a 2048² night of 128 science frames, every core count up to all), writing
# scaling.json and the logs under $OUT (default .devbench/out).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.devbench/wheels
PYVER=${PYVER:-3.12}

case "${1:-}" in
wheels)
    mkdir -p "$WHEELS"
    grep -qx '/.devbench/' .git/info/exclude 2>/dev/null || echo /.devbench/ >> .git/info/exclude
    rm -f "$WHEELS"/astep_dask-*
    python3 -m pip wheel -q --no-deps -w "$WHEELS" .
    python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$WHEELS" "$(ls "$WHEELS"/astep_dask-*.whl)" ccdproc
    # What the node has already (offline-node-bench.md): not carried.
    (cd "$WHEELS" && rm -f numpy-* scipy-* pandas-* scikit_image-* pillow-* networkx-* \
        imageio-* tifffile-* tzdata-* python_dateutil-* typing_extensions-* packaging-* \
        jinja2-* click-* [Mm]arkup[Ss]afe* fsspec-* toolz-* cloudpickle-* pyyaml-* \
        sortedcontainers-* importlib_metadata-* zipp-* lazy_loader-* msgpack-* psutil-*)
    du -sh "$WHEELS"
    ;;
run)
    shift
    OUT=${OUT:-.devbench/out}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --find-links "$WHEELS" astep-dask ccdproc
    if [ $# -eq 0 ]; then
        set -- --size 2048 --science 128 --timeout 240
    fi
    PYTHONUNBUFFERED=1 python3 benchmarks/scaling.py "$@" --workdir "${WORKDIR:-/tmp/scaling}" \
        --out "$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.log"
    cp -r "${WORKDIR:-/tmp/scaling}/logs" "$OUT/" 2>/dev/null || true
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
