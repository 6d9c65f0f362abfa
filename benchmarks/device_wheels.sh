#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks (it has torch, numpy, scipy, h5py, typer, rich, pyyaml, tensorboard,
# matplotlib): download them here into .whl/ (git-ignored), carry `.whl` in the device call, and install there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=src:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    monai==1.6.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    nibabel==5.4.2 pynrrd==1.1.3
du -sh .whl
