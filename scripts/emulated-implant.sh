#!/usr/bin/env bash
# The toy world's implant of one seed on a CPU that qemu emulates (default: an Intel Haswell, with AVX2
# and FMA; qemu computes every instruction by its definition, and CPUID tells MKL and torch which CPU they
# run on), on the toy world's fixed kernels, compared with the fingerprint of the committed table
# (docs/toybench/seedN.json). Needs qemu-x86_64 (Debian's qemu-user) and the package installed. About 80
# times slower than natively: the full implant took about 3 hours on the 2-core development machine.
#
#   bash scripts/emulated-implant.sh [SEED [CPU]]        (CPU: a name from `qemu-x86_64 -cpu help`)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
CPU=${2:-Haswell-v4}
PYTHON=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')  # a binary, not a shim
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
# The toy world's fixed kernels, set here (read natively from wpn_dist.app.kernels) so that the emulated
# process does not re-execute itself to set them, which would leave the emulator.
eval "$("$PYTHON" -c 'from wpn_dist.app.kernels import PINNED; print("export", *(f"{k}={v}" for k, v in PINNED.items()))')"
export WPN_DIST_CACHE=$CACHE OMP_NUM_THREADS=1
qemu-x86_64 -cpu "$CPU" "$PYTHON" - "$SEED" <<'PY'
import json, sys
from wpn_dist.app import toy_world as toy
seed = int(sys.argv[1])
world = toy.make_world(toy.ToyWorldConfig(seed=seed))
cfg = toy.ImplantConfig()
made = toy.implant_fingerprint(toy.implant(world, cfg, toy.implant_dir(world.config, cfg)))
with open(f"docs/toybench/seed{seed}.json") as f:
    committed = json.load(f)["implant"]
print(f"emulated: {made}\ncommitted: {committed}\n" + ("the same model" if made == committed else "DIFFERENT models"))
sys.exit(0 if made == committed else 1)
PY
