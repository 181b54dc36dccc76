#!/usr/bin/env bash
# The Python packages a lent GPU machine (Python 3.12, x86-64, no internet) lacks, as wheels in
# .whl/ (in .gitignore), at the versions installed here. Run from the repository root; the
# device call then names `.whl` in `carry` (tools/gpu_checks.sh installs them).
set -euo pipefail
rm -rf .whl && mkdir .whl
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Pure Python: built here (deepspeed is published as a source archive only).
python -m pip wheel -q --no-deps -w .whl \
  "deepspeed==$(version deepspeed)" "webdataset==$(version webdataset)" "braceexpand==$(version braceexpand)" \
  "hjson==$(version hjson)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "pydantic==$(version pydantic)"
# Compiled: the CPython 3.12 manylinux build.
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic-core==$(version pydantic_core)"
ls -la .whl
