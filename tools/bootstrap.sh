#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment; prints the python to use on stdout.
#   SEDD_VENV   venv folder (default .venv)
#   SEDD_MCORE  megatron-core version (default: what pip resolves; 0.16.1 on Python 3.11)
#   SEDD_TORCH  torch requirement installed first (default torch==2.13.0, the local CPU wheel;
#               an unpinned torch would pull a multi-GB CUDA build)
#   SEDD_PYTHON an interpreter to use as it is instead of a venv (e.g. an NGC container's python with its
#               own torch, Transformer Engine and apex): checked to import what the project needs, nothing installed
# A stamp of this script + pyproject.toml + the settings makes a repeated run a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${SEDD_PYTHON:-}" ]; then
  # The project must be importable by that interpreter: installed into it (pip install -e .) or from this checkout.
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$SEDD_PYTHON" -W ignore -c 'import torch, sedd_scale.compat, megatron.core, deepspeed, webdataset, yaml, safetensors, tiktoken' >&2 || {
    echo "[bootstrap] SEDD_PYTHON=$SEDD_PYTHON cannot import what sedd-scale needs (see above): install the missing packages into it (pip install -e $root), or unset SEDD_PYTHON to build .venv" >&2; exit 1; }
  echo "$SEDD_PYTHON"; exit 0
fi
venv="${SEDD_VENV:-$root/.venv}"
mcore="${SEDD_MCORE:-}"
torch_req="${SEDD_TORCH:-torch==2.13.0}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3

# This machine's pip config names optional local indexes that may not exist; drop that noise.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Only what changes the installed set goes into the stamp (not pytest settings in pyproject.toml).
deps="$("$py" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(p["dependencies"], p.get("optional-dependencies"))' "$root/pyproject.toml")"
stamp="$( (echo "$deps"; cat "$root/tools/bootstrap.sh"; echo "$mcore $torch_req") | sha256sum | cut -c1-16)"
if [ -f "$venv/.stamp" ] && [ "$(cat "$venv/.stamp")" = "$stamp" ]; then
  echo "$venv/bin/python"; exit 0
fi

{
  echo "[bootstrap] installing into $venv (torch: $torch_req, megatron-core: ${mcore:-resolved})"
  # Updated in place (pip skips what is satisfied) so that processes using the venv keep working.
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  pip=(pip_quiet "$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip setuptools wheel
  "${pip[@]}" "$torch_req"
  "${pip[@]}" numpy "packaging>=24.2"
  if [ -n "$mcore" ]; then
    # megatron-core >= 0.17 declares Python >= 3.12 but runs on 3.11 (see docs/platform.md).
    "${pip[@]}" --no-deps --ignore-requires-python "megatron-core==$mcore"
  fi
  # deepspeed is an sdist whose setup.py imports torch: build it against the torch above.
  "${pip[@]}" --no-build-isolation -e "$root[test]"
  "$venv/bin/python" -W ignore - <<'PY'
import torch, sedd_scale.compat, megatron.core, deepspeed  # noqa: F401  (fail the bootstrap, not the first job)
print(f"[bootstrap] torch {torch.__version__}, megatron-core {megatron.core.__version__}, deepspeed {deepspeed.__version__}")
PY
  echo "$stamp" > "$venv/.stamp"
} >&2
echo "$venv/bin/python"
