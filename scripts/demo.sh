#!/usr/bin/env bash
# Migrate the SQLite database, create a demo product with a member and a worker
# token, print them with the board, GraphiQL and metrics addresses, and serve.
# Each run replaces the demo's tokens (`token create --replace` revokes the earlier
# `demo-member` / `demo-worker`): secrets are not stored, so they cannot be shown
# again, and this way they do not pile up.  `fleetbridge token list` shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PRODUCT=${FLEET_DEMO_PRODUCT:-demo}

"$BIN/fleetbridge" migrate
MEMBER=$("$BIN/fleetbridge" token create --product "$PRODUCT" --role member --name demo-member --replace)
WORKER=$("$BIN/fleetbridge" token create --product "$PRODUCT" --role worker --name demo-worker --replace)
# The settings as the service sees them (environment, then .env), the password masked.
read -r HOST PORT DATABASE_SHOWN < <("$BIN/python" -c 'from app.config import get_settings
from app.redact import mask_url
s = get_settings(); print(s.host, s.port, mask_url(s.database_url))')

cat <<MSG

  fleetbridge is starting with product '$PRODUCT' on $DATABASE_SHOWN

  fleet board:   http://$HOST:$PORT/board   (paste a token to sign in)
  GraphiQL:      http://$HOST:$PORT/graphql
  metrics:       http://$HOST:$PORT/metrics   (Prometheus; /healthz and /readyz for probes)
  member token:  $MEMBER
  worker token:  $WORKER

  In GraphiQL set the header  {"Authorization": "Bearer <token>"}.

MSG
exec "$BIN/fleetbridge" serve --host "$HOST" --port "$PORT"
