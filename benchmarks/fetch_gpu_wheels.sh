#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels a GPU device call needs and the GPU machine lacks: it has no internet,
# and its preinstalled stack (Python 3.12, torch, torchvision, timm, numpy, Pillow, OpenCV, scikit-learn, safetensors,
# tqdm, matplotlib, PyYAML, cloudpickle) lacks raddino's omegaconf, webdataset, submitit and pydicom, and the peers
# of benchmarks/peers.py (Meta's dinov2, lightly). --no-deps: each needed dependency is named here instead.
# dinov2's pinned torch 2.0 / xformers and lightly's hydra / pytorch_lightning are not imported by the modules
# peers.py uses. The device call names .whl in `carry` and installs with benchmarks/gpu_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest .whl \
    "omegaconf==2.3.0" "webdataset==1.0.2" "braceexpand==0.1.7" "submitit==1.5.4" "pydicom==3.0.2" \
    "dinov2==0.0.1.dev2" "lightly==1.6.0"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.*, published as a source archive only: build its (pure-Python) wheel
$PIP wheel --quiet --no-deps --wheel-dir .whl "antlr4-python3-runtime==4.9.3"
ls -l .whl
