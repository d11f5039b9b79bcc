#!/usr/bin/env bash
# Set up the environment if needed, then run the enumerable-distribution demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(bash tools/bootstrap.sh)
PYTHONWARNINGS=ignore exec "$py" tools/oracle_demo.py "$@"
