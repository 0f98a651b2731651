#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that a GPU machine without network needs
# on top of its preinstalled PyTorch stack (torch, torchvision, timm, huggingface_hub, safetensors,
# regex, tqdm, numpy, ...): open_clip_torch (the version of this environment) and its pure-Python
# dependencies ftfy and wcwidth. They land in .whl/ (ignored by git), which a remote run carries
# along; benchmarks/device_check.sh installs them there with --no-index --no-deps.
#
# Usage: bash benchmarks/fetch_device_wheels.sh [DEST]      (DEST default: .whl in the repo root)
# Env:   PYTHON (default python3): the interpreter whose open_clip version is pinned;
#        WHEEL_PYTHON_VERSION (default 3.12): the GPU machine's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
py="${PYTHON:-python3}"
pyver="${WHEEL_PYTHON_VERSION:-3.12}"
version="$("$py" -c 'from importlib.metadata import version; print(version("open_clip_torch"))' 2>/dev/null || true)"
spec="open_clip_torch${version:+==$version}"
mkdir -p "$dest"
"$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$dest" "$spec" ftfy wcwidth
ls -l "$dest"
du -sh "$dest"
