#!/usr/bin/env bash
# Prepare the GPU check's carry folder, on a CPU machine that reaches the package index (docs/scaling.md, "GPU check").
#
#   bash benchmarks/gpu/prepare.sh            # with the project's virtualenv active (or PYTHON=/path/to/python)
#
# 1. downloads exactly the wheels of benchmarks/gpu/wheels.txt (what the GPU image lacks) for CPython 3.12 on
#    manylinux x86_64, without dependency resolution, into benchmarks/gpu/wheels/ (git-ignored; does not travel);
# 2. benchmarks/gpu/wheelkit.py prepare: one wheel per pin with the right tags, RECORD hashes, every Requires-Dist
#    carried or in the image (image.txt); packs the wheels (uncompressed, then xz) and the cached unigrad-tiny
#    model into benchmarks/gpu/carry/ (git-ignored; this is what travels), and adds the working tree and the carry
#    folder up against the device tool's 64 MiB.
# Then, on any machine with a GPU: copy the tree with benchmarks/gpu/carry and run `bash benchmarks/gpu/check.sh`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-python}
cd "$repo"
mkdir -p "$here/wheels"
echo "downloading the wheels of benchmarks/gpu/wheels.txt for CPython 3.12, manylinux x86_64"
"$py" "$here/wheelkit.py" pins > "$here/wheels/requirements.txt"
# manylinux_2_28: pyarrow, pandas and charset-normalizer publish no older tag for 3.12; the GPU check itself tells
# if the image's glibc is older than a wheel needs.
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$here/wheels" -r "$here/wheels/requirements.txt"
"$py" "$here/wheelkit.py" prepare "$@"
