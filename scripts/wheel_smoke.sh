#!/usr/bin/env bash
# Install smoke test (issue 10 §1): build the wheel, install it into a fresh virtualenv
# outside the checkout, and use it as a new user would from an empty directory:
# migrate, token create, serve, /readyz, one GraphQL round trip (write, then read back).
# Fails on a setuptools warning during the build.  Called by .ci/run after `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}   # the dev environment (make install), which has uv
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fleetbridge-wheel.XXXXXX")
SERVER=""
cleanup() {
  if [[ -n "$SERVER" ]] && kill -0 "$SERVER" 2>/dev/null; then
    kill "$SERVER" && wait "$SERVER" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "wheel smoke: $*" >&2; [[ -f "$WORK/serve.log" ]] && tail -n 40 "$WORK/serve.log" >&2; exit 1; }

echo "wheel smoke: building the wheel" >&2
# sdist first, then the wheel from it: a stale build/ in the checkout cannot leak in
"$BIN/uv" build --out-dir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log" >&2; fail "the wheel did not build"; }
if grep -E "Warning|!!" "$WORK/build.log" >&2; then fail "the build printed a warning"; fi
WHEEL=$(ls "$WORK"/dist/fleetbridge-*.whl)

echo "wheel smoke: installing $(basename "$WHEEL") into a fresh venv" >&2
"$BIN/uv" venv --quiet --python "$BIN/python" "$WORK/venv"
"$BIN/uv" pip install --quiet --python "$WORK/venv/bin/python" "$WHEEL" \
  || fail "the wheel did not install"
FB="$WORK/venv/bin/fleetbridge"

mkdir "$WORK/run" && cd "$WORK/run"   # an empty directory, far from the checkout
env -u DATABASE_URL -u PYTHONPATH "$FB" --version
export DATABASE_URL="sqlite+aiosqlite:///$WORK/run/fleet.db"
"$FB" migrate || fail "migrate failed"
TOKEN=$("$FB" token create --product smoke --role admin --name smoke) || fail "token create failed"
PORT=$("$WORK/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FLEET_LOG_LEVEL=warning "$FB" serve --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVER=$!

# Readiness, then a write and a read over GraphQL, with the installed httpx.
FLEET_SMOKE_URL="http://127.0.0.1:$PORT" FLEET_SMOKE_TOKEN="$TOKEN" FLEET_SMOKE_PID="$SERVER" \
  "$WORK/venv/bin/python" - <<'PY' || fail "the served wheel did not answer correctly"
import os, sys, time
import httpx

url, token, pid = os.environ["FLEET_SMOKE_URL"], os.environ["FLEET_SMOKE_TOKEN"], int(os.environ["FLEET_SMOKE_PID"])
deadline = time.monotonic() + 90  # a first start compiles every module
with httpx.Client(base_url=url, timeout=5) as http:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("serve exited")
        try:
            ready = http.get("/readyz")
            if ready.status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit("no /readyz in 90 s")
        time.sleep(0.1)
    auth = {"Authorization": f"Bearer {token}"}
    created = http.post("/graphql", headers=auth, json={
        "query": 'mutation { createItem(input: {title: "smoke"}) { id title status } }'}).json()
    item = created["data"]["createItem"]
    read = http.post("/graphql", headers=auth, json={
        "query": "query($id: ID!) { item(id: $id) { title } viewer { productId role } }",
        "variables": {"id": item["id"]}}).json()
    assert read["data"] == {"item": {"title": "smoke"},
                            "viewer": {"productId": "smoke", "role": "ADMIN"}}, read
    print(f"wheel smoke: /readyz {ready.json()['status']}, item {item['id']} written and read back",
          file=sys.stderr)
PY
[[ ! -e "$WORK/run/fleetbridge.db" ]] || fail "a stray ./fleetbridge.db was created"
echo "wheel smoke: passed in $((SECONDS - START)) s" >&2
