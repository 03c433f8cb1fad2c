#!/usr/bin/env bash
# Device check: compile and pack qiao's built-in models (the MoE model and the decoder included)
# for TARGET with reference inputs and outputs into one folder (< 60 MB), then run it.
#
#   benchmarks/device/check.sh TARGET [--arch ARCH] [-o DIR] [--models a,b,c] [--repeat N]
#                              [--python X.Y]   (the device's Python; default: this one)
#                              [--from NAME=ARTIFACT ...]   (pack an artifact instead of compiling)
#
# Build (here, where qiao is installed): compiles each model, `qiao pack --with-reference`s it
# into DIR/bundles/, stores TVM's runtime and tvm_ffi once in DIR/runtime/ and a TorchScript trace
# per model in DIR/torch/ (the PyTorch eager baseline).
# Run (on the device machine: Python >= 3.10 with NumPy; torch optional; nothing of qiao):
#   python DIR/run_bundles.py [--repeat N]
# which runs every bundle, compares with the stored ONNX Runtime outputs, times qiao and PyTorch
# eager on the same device, prints one table and writes DIR/check_result.json plus one
# `qiao bench`-schema document per model in DIR/results/. Exit 0 only if every bundle matches.
#
# For TARGET=cpu both steps run here (what CI runs). For a GPU target only the build runs here
# (the folder's size is printed); copy DIR to the GPU machine and run the second command there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"          # needs qiao (the build)
run_python="${RUN_PYTHON:-$python}"  # needs NumPy only (the run, for TARGET=cpu)
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 TARGET [--arch ARCH] [-o DIR] [--models a,b] [--repeat N]" >&2
    exit 2
fi
target="$1"; shift
arch=""; out=""; models=""; repeat=50; from=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) arch="$2"; shift 2 ;;
        -o|--output) out="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --from) from+=(--from "$2"); shift 2 ;;
        --python) from+=(--python "$2"); shift 2 ;;
        *) echo "check.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
out="${out:-device-check-${target}${arch:+-$arch}}"
build=("$python" "$here/check.py" "$target" -o "$out")
[[ -n "$arch" ]] && build+=(--arch "$arch")
[[ -n "$models" ]] && build+=(--models "$models")
"${build[@]}" "${from[@]}"
if [[ "$target" == "cpu" ]]; then
    "$run_python" "$out/run_bundles.py" --repeat "$repeat"
else
    echo "[check] built $out for $target; on the device machine run:"
    echo "    python $out/run_bundles.py --repeat $repeat"
fi
