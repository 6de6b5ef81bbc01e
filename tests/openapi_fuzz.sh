#!/usr/bin/env bash
# Fuzzes the running API from its own OpenAPI document with schemathesis (from PyPI), and
# validates the document with openapi-spec-validator. Fails on any server error, any status
# or content type the document does not declare, or any response that does not match its
# schema. Bounded in time (RAPPORT_FUZZ_SECONDS, default 120). The generator's own health
# checks (too many generated values filtered out, generation too slow) say nothing about the
# API and would make CI flaky, so they are off. Run by .ci/run; by hand:
#   cargo build && tests/openapi_fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${RAPPORT_FUZZ_SECONDS:-120}
bin=${RAPPORT_BIN:-target/debug/rapport}
base_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/rapport}
work=$(mktemp -d)

# CPython before 3.11.8 and 3.12.2 shares the AST builder's recursion counter between threads:
# schemathesis' two workers then fail at random with "SystemError: AST constructor recursion
# depth mismatch" (python/cpython#106905; seen once in CI, in hypothesis's lambda_sources.py,
# on 3.11.7). Take an interpreter without the bug when the machine has one (pyenv's too).
fixed='import sys; v = sys.version_info[:3]; sys.exit(0 if v >= (3, 12, 2) or (3, 11, 8) <= v < (3, 12) else 1)'
python=
for candidate in ${RAPPORT_FUZZ_PYTHON:-} python3 python3.13 python3.12 \
  $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*/bin/python3 2>/dev/null | sort -rV); do
  if "$candidate" -c "$fixed" >/dev/null 2>&1 && "$candidate" -m venv --help >/dev/null 2>&1; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  python=python3
  echo "warning: no Python >= 3.11.8 / 3.12.2 here; schemathesis may fail on CPython's AST bug" >&2
fi
pyver=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
venv=${RAPPORT_FUZZ_VENV:-target/fuzz-venv-$pyver}

if [ ! -x "$venv/bin/schemathesis" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    schemathesis==4.32.5 openapi-spec-validator==0.7.2
fi

echo "--> openapi-spec-validator docs/openapi.json"
"$venv/bin/openapi-spec-validator" docs/openapi.json

db="rapport_fuzz_$$"
db_url="${base_url%/*}/$db"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DATABASE_URL="$db_url" RAPPORT_ADMIN_TOKEN=fuzz-admin \
  RAPPORT_SECRET_KEY=KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio= \
  RAPPORT_LOG_LEVEL=error RAPPORT_TENANT_RATE_LIMIT=0 \
  RAPPORT_OUTBOX_LOG="$work/outbox.jsonl" RAPPORT_LISTEN="127.0.0.1:$port" \
  RAPPORT_EMBEDDED_POSTGRES=never

cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  psql "${base_url%/*}/postgres" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" migrate >/dev/null
"$bin" tenant create --name Fuzz --slug fuzz --default-country HR --default-locale hr \
  --timezone Europe/Zagreb >/dev/null
key=$("$bin" api-key create --tenant fuzz --name fuzz | sed -n 's/.*"key": "\(.*\)".*/\1/p')
"$bin" serve 2>"$work/server.log" &
server=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done

echo "--> schemathesis for ${seconds}s over http://127.0.0.1:$port/openapi.json"
# tests/openapi_hooks.py: a serializer for the raw email webhook's message/rfc822.
SCHEMATHESIS_HOOKS=tests.openapi_hooks PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
"$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  -H "Authorization: Bearer $key" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --suppress-health-check=filter_too_much,too_slow \
  --max-time "$seconds" --workers 2 --no-color >"$work/report.txt" 2>&1 && status=0 || status=$?
# The summary, and every failure when there are some.
if [ "$status" -ne 0 ]; then
  cat "$work/report.txt"
  echo "--> server log"; tail -50 "$work/server.log"
else
  sed -n '/= SUMMARY =/,$p' "$work/report.txt"
fi
exit "$status"
