#!/usr/bin/env bash
# unigrad's GPU check in one command (docs/scaling.md, "GPU check"), on any machine with a CUDA GPU:
#
#   bash benchmarks/gpu/check.sh              # at most ~8 minutes; needs benchmarks/gpu/carry from prepare.sh
#   bash benchmarks/gpu/check.sh --dry-run    # anywhere, no GPU: what can be checked without one (seconds)
#   bash benchmarks/gpu/check.sh --help       # stages, budget, summary path, --only / --skip
#
# It installs the carried wheels (benchmarks/gpu/carry, made by prepare.sh; with the device tool pass
# carry=["benchmarks/gpu/carry"]) into a temporary directory, then runs the GPU-marked tests, a short training run of
# examples/default.yaml on the GPU and a timed GRPO step of unigrad against TRL on a 0.5 B Qwen2 shape, printing as
# it goes. The JSON summary goes to $OUT/gpu_check.json when OUT is set (else benchmarks/gpu/out/gpu_check.json),
# the stages' logs next to it; the last line printed is gpu_step_ratio_vs_trl=<ratio>. Exit code 0 when every
# stage passed. PYTHON=/path/to/python picks the interpreter (default python3, else python): on the GPU machine
# it must be the image's CPython 3.12, the one with torch.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
    py=$(command -v python3 || command -v python || true)
fi
if [ -z "$py" ]; then
    echo "check.sh: no python3 or python on PATH (set PYTHON=...)" >&2
    exit 2
fi
exec "$py" "$here/gpu_check.py" "$@"
