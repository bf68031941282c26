#!/usr/bin/env bash
# Creates a development HSM: one SoftHSM2 token per key domain (kms-hrss, kms-bank) and one for a bureau station
# (kms-station-a1) under DIR, with random PINs in DIR/pins/ (mode 0600). Idempotent: existing tokens are kept.
# Afterwards: export SOFTHSM2_CONF=DIR/softhsm2.conf
set -euo pipefail
dir=${1:?usage: scripts/dev-hsm.sh DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
"$python" - "$dir" <<'PY'
import sys
from pathlib import Path

from kms.hsm import softhsm

root = Path(sys.argv[1]).resolve()
conf = softhsm.write_conf(root)
for label, name in (("kms-hrss", "hrss"), ("kms-bank", "bank"), ("kms-station-a1", "station-a1")):
    created = softhsm.ensure_token(conf, label, root / "pins" / f"{name}.pin", root / "pins" / f"{name}.so-pin")
    print(f"{label}: {'created' if created else 'present'}")
print(f"SOFTHSM2_CONF={conf}")
PY
