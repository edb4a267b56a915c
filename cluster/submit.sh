#!/usr/bin/env bash
# Submit an eep campaign to a Ray cluster's job server and follow its log.
#
#   cluster/submit.sh configs/mixtral-8x7b-squad-keep4.yaml --run-dir /home/ray/runs/squad-keep4
#
# RAY_ADDRESS: the job server (default http://127.0.0.1:8265, e.g. through `ray dashboard
# cluster/aws-p5en.yaml`). Token authentication (Ray >= 2.52): the token is read from
# ~/.ray/auth_token or RAY_AUTH_TOKEN; set RAY_AUTH_MODE=disabled for a head started that way.
# The repository is uploaded as the job's working directory (.gitignore and .rayignore apply).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG.yaml [eep search options...]" >&2
    exit 2
fi
config=$1
shift
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit \
    --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
    --working-dir . \
    --submission-id "eep-$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)" \
    -- eep search "$config" --quiet "$@"
