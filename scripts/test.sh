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
echo "== ruff"
ruff check services gateway tandem/cli.py scripts tests
ruff format --check services gateway tandem/cli.py scripts tests
echo "== mypy --strict"
mypy
echo "== pytest"
python -m pytest -p no:cacheprovider "$@"
