# Shared by the scripts that install Python tools for the tests:
# `pip_venv SCRIPT VENV PACKAGE==VERSION...` makes a virtualenv at VENV
# holding exactly those versions, installing from PyPI only when one
# differs (idempotent).
pip_venv() {
  local script="$1" venv="$2"
  shift 2
  local have
  have="$("$venv/bin/python" - "$@" 2>/dev/null <<'PY' || true
import importlib.metadata as m, sys
print(" ".join(f"{p.split('==')[0]}=={m.version(p.split('==')[0])}" for p in sys.argv[1:]))
PY
)"
  if [ "$have" != "$*" ]; then
    echo "$script: installing $* from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  fi
}
