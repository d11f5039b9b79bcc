#!/usr/bin/env bash
# The test command: sets up both environments on a fresh machine (a no-op once built), lints with ruff, runs the
# whole suite under megatron-core 0.16.1 (the newest for Python 3.11), then the megatron-dependent
# tests again under 0.19.x. Extra arguments go to both pytest runs, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
py=$(bash tools/bootstrap.sh)
py019=$(SEDD_VENV=.venv-mcore019 SEDD_MCORE=0.19.2 bash tools/bootstrap.sh)
echo "== ruff (pyproject.toml: F, E, W, I, C901; line length 120)"
"$py" -m ruff check .
echo "== megatron-core $("$py" -c 'import importlib.metadata as m; print(m.version("megatron-core"))'): full suite"
# Two workers (SEDD_TEST_WORKERS), a test file each: a rank often waits (imports, rendezvous, a subprocess), so two
# files at once keep both cores busy; a file's module fixtures are built once.
workers=(-n "${SEDD_TEST_WORKERS:-2}" --dist loadfile)
"$py" -m pytest "${workers[@]}" --durations=15 "$@"
echo "== megatron-core $("$py019" -c 'import importlib.metadata as m; print(m.version("megatron-core"))'): megatron-dependent tests"
"$py019" -m pytest "${workers[@]}" -m "megatron" "$@"
