#!/usr/bin/env bash
# Installs what kms needs on a fresh Debian machine: SoftHSM2 (apt-get, when missing) and a virtual environment
# with kms and its development tools. Safe to run again.
set -euo pipefail
venv=${1:-.venv}

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "bootstrap: installing ${need_apt[*]} with apt-get"
  $sudo apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null
    $sudo apt-get install -y -q "${need_apt[@]}" >/dev/null
  }
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q -e '.[dev]'
echo "bootstrap: ready ($("$venv/bin/python" -c 'import kms; print("kms", kms.__version__)'), $(softhsm2-util --version 2>/dev/null | sed 's/^/SoftHSM /'))"
