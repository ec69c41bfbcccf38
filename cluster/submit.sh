#!/usr/bin/env bash
# Submits `moeray serve` as a Ray job to a running cluster and prints its status.
#   cluster/submit.sh [CONFIG_JSON]    (default cluster/gpt-oss-20b.json)
# Needs RAY_ADDRESS (the dashboard, e.g. http://127.0.0.1:8265) and the cluster's token
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): Ray's CLI sends it only with
# RAY_AUTH_MODE=token, which this script sets unless the caller chose a mode. The wheel in dist/
# goes with the job, so workers get the compiled core (a plain working_dir upload would drop the
# .so: .gitignore is honoured).
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
cd "$(dirname "$0")/.."
config="${1:-cluster/gpt-oss-20b.json}"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster}"
wheel=$(ls dist/moeray-*.whl 2>/dev/null | tail -n 1 || true)
if [ -z "$wheel" ]; then
  pip wheel --no-deps -w dist .
  wheel=$(ls dist/moeray-*.whl | tail -n 1)
fi
id="moeray-serve-$(date +%s)"
ray job submit --no-wait --submission-id "$id" --working-dir . \
  --runtime-env-json "{\"py_modules\": [\"$(realpath "$wheel")\"]}" \
  -- moeray serve --config "$config"
ray job status "$id"
echo "follow it with: ray job logs -f $id ; stop it with: ray job stop $id"
