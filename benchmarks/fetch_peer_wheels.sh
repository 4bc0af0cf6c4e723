#!/usr/bin/env bash
# Download the peer packages benchmarks/peers.py compares raddino with into .peers/ (git-ignored), so the device tool
# can carry them to a GPU machine that has no internet. --no-deps: their only runtime imports (torch, torchvision,
# timm, numpy, Pillow) come with the GPU machine's preinstalled stack; dinov2's pinned torch 2.0 / xformers 0.0.18
# and lightly's hydra / pytorch_lightning are not imported by the modules peers.py uses.
# Install there with: pip install --no-index --no-deps --find-links .peers dinov2 lightly
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-pip}
mkdir -p .peers
"$PIP" download --quiet --no-deps --dest .peers dinov2==0.0.1.dev2 lightly==1.6.0
ls -l .peers
