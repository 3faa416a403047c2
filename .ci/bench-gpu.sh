#!/bin/bash
# `agentrl bench gpu` on a machine with a GPU, torch and transformers but no network and no agentrl install
# (the lent GPU machines: Python 3.12, torch 2.11, transformers 5.17). What agentrl imports beyond what such a
# machine has travels as wheels in .whl (ignored by git), made here once with:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     gymnasium==1.4.0 farama-notifications==0.0.6
#
# Then, with .whl carried: bash .ci/bench-gpu.sh --out "$OUT/bench-gpu.json" (arguments go to the bench).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/agentrl-site .whl/*.whl
    export PYTHONPATH=/tmp/agentrl-site
fi
export PYTHONPATH="$PWD:$PWD/envs:$PWD/sandboxes:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec python3 -c "import sys; from agentrl.cli import main; sys.exit(main(['bench', 'gpu', *sys.argv[1:]]))" "$@"
