#!/usr/bin/env bash
# Development TLS certificates for Tandem: a CA, a server certificate (localhost, 127.0.0.1, ::1) and a client
# certificate, written into the folder given (see tandem/cli/devcerts.py). Never for production.
#   scripts/gen_dev_certs.sh certs/ [--name my-host ...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 FOLDER [--name SERVER_NAME ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
folder=$1
shift
case $folder in /*) ;; *) folder="$OLDPWD/$folder" ;; esac
exec "$python" -m tandem.cli.devcerts "$folder" "$@"
