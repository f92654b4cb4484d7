#!/usr/bin/env bash
# Migrate the SQLite database, create a demo product with a member and a worker
# token, print them with the board and GraphiQL addresses, and serve.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PRODUCT=${FLEET_DEMO_PRODUCT:-demo}
HOST=${FLEET_HOST:-127.0.0.1}
PORT=${FLEET_PORT:-8000}

"$BIN/fleetbridge" migrate
MEMBER=$("$BIN/fleetbridge" token create --product "$PRODUCT" --role member --name demo-member)
WORKER=$("$BIN/fleetbridge" token create --product "$PRODUCT" --role worker --name demo-worker)

cat <<MSG

  fleetbridge is starting with product '$PRODUCT' on ${DATABASE_URL:-the SQLite file ./fleetbridge.db}

  fleet board:   http://$HOST:$PORT/board   (paste a token to sign in)
  GraphiQL:      http://$HOST:$PORT/graphql
  member token:  $MEMBER
  worker token:  $WORKER

  In GraphiQL set the header  {"Authorization": "Bearer <token>"}.

MSG
exec "$BIN/fleetbridge" serve --host "$HOST" --port "$PORT"
