#!/usr/bin/env bash
# The full check: install, generated-code drift, buf lint, ruff, mypy --strict, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== generated code in sync with protos/"
python scripts/gen_protos.py --check
echo "== buf lint"
(cd protos && ../.tools/node_modules/.bin/buf lint)
echo "== buf breaking"
# Against the protos of the previous commit (or BUF_AGAINST, e.g. '.git#branch=main,subdir=protos' on a branch):
# a change that would break generated clients fails here.
against=${BUF_AGAINST:-}
if [ -z "$against" ] && git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:protos 2>/dev/null; then
  against=".git#ref=HEAD~1,subdir=protos"
fi
if [ -n "$against" ]; then
  .tools/node_modules/.bin/buf breaking protos --against "$against"
else
  echo "no earlier protos to compare with"
fi
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== pytest"
python -m pytest -p no:cacheprovider "$@"
