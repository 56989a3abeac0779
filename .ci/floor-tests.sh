#!/usr/bin/env bash
# CI: run the fast tests against the LOWEST transformers that setup.py allows.
#
# The floor is written once, in setup.py ("transformers>=X,<6"); this script reads it from there.
# It makes a throwaway venv that sees the system packages (--system-site-packages), installs exactly
# transformers==X into it (pip may also swap huggingface_hub / tokenizers / datasets for versions that
# fit X; torch is pinned to the system's version so it is never touched), checks what gets imported,
# then runs pytest from the repository root.
#
# Usage: .ci/floor-tests.sh [TEST_FILE ...]   (default: the fast test files below)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}

# Fast tests that go through transformers: no deepspeed launcher, except test_hf_io.py's (one 2-rank CPU
# launch, ~15 s), kept because it is the test that fails below the floor (a bf16 export must load back as
# bf16 without dtype=); its export-command test (two more launches, a training run and the export) is left
# to the main run. Left to the main run too: the pure-torch tests (pooling, losses) and test_baselines.py
# (it implants the toy model first; the methods' steps on tiny models are test_methods.py's).
DEFAULT_TESTS=(tests/test_packing.py tests/test_data.py tests/test_methods.py tests/test_memory.py tests/test_judges.py
               tests/test_bad_input.py tests/test_hf_io.py -k "not export_command")
if [ "$#" -gt 0 ]; then TESTS=("$@"); else TESTS=("${DEFAULT_TESTS[@]}"); fi

# Requirements for the venv, from setup.py: install_requires plus the "test" extra, with transformers
# pinned to its floor and torch to the version already installed. First line: the floor.
REQS=$("$PY" - <<'EOF'
import ast, re, sys
import torch
tree = ast.parse(open("setup.py").read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
reqs = list(kw["install_requires"]) + list(kw.get("extras_require", {}).get("test", []))
floor = None
out = []
for r in reqs:
    name = re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower()
    if name == "transformers":
        m = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", r)
        if not m:
            sys.exit(f"setup.py: no '>=' floor in {r!r}")
        floor = m.group(1)
        # With its hub-kernels extra: the kernels package that this transformers was written against. A
        # newer transformers installs a newer kernels in the system packages, whose API the floor's import
        # of its hub-kernels integration does not fit (transformers 5.0.0 against kernels 0.19 fails at
        # import); the venv's own copy shadows it.
        out.append(f"transformers[hub-kernels]=={floor}")
    elif name == "torch":
        out.append("torch==" + torch.__version__.split("+")[0])
    else:
        out.append(r)
if floor is None:
    sys.exit("setup.py: no transformers requirement")
print(floor)
print("\n".join(out))
EOF
)
FLOOR=$(head -n1 <<<"$REQS")
VENV=$(mktemp -d "${TMPDIR:-/tmp}/wpn-floor.XXXXXX")
trap 'rm -rf "$VENV"' EXIT
tail -n +2 <<<"$REQS" >"$VENV/requirements.txt"
echo "floor-tests: transformers==$FLOOR (from setup.py); venv $VENV"

"$PY" -m venv --system-site-packages "$VENV/env"
"$VENV/env/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/requirements.txt"
"$VENV/env/bin/python" -m pip check

# What actually gets imported: the floor transformers, the system torch, and this checkout's package.
"$VENV/env/bin/python" - "$FLOOR" "$("$PY" -c 'import torch; print(torch.__version__)')" "$REPO" <<'EOF'
import os, sys
from packaging.version import Version
import torch, transformers, wpn_dist
floor, system_torch, repo = sys.argv[1:]
print(f"floor-tests: transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)}), "
      f"torch {torch.__version__}")
assert Version(transformers.__version__) == Version(floor), (transformers.__version__, floor)
assert torch.__version__ == system_torch, (torch.__version__, system_torch)
assert os.path.realpath(wpn_dist.__file__).startswith(os.path.realpath(repo) + os.sep), wpn_dist.__file__
EOF

PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cpu \
    "$VENV/env/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
