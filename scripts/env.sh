# Sourced by the scripts: one persistent target dir outside the clone, shared by
# every checkout and CI run on this machine, so FAISS (cmake, ~7 min) builds once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# Starts `shoal dev` ($shoal) with its data under $1 (its output appended to $2 when
# given), stops it when the script exits, and returns once a leader and both nodes
# are up. Used by demo.sh and evals.sh.
start_dev() {
  local data=$1
  # SHOAL_DEV_INSECURE=1: without TLS and keys (the bench's clients speak neither yet).
  [[ -n ${SHOAL_DEV_INSECURE:-} ]] && export SHOAL_INSECURE=true
  if [[ -n ${2:-} ]]; then
    "${shoal:?}" dev --data-dir "$data" >>"$2" 2>&1 &
  else
    "${shoal:?}" dev --data-dir "$data" &
  fi
  SHOAL_DEV_PID=$!
  # What `shoal dev` makes for its clients (TLS and the root key), for the commands below.
  if [[ -z ${SHOAL_DEV_INSECURE:-} ]]; then
    export SHOAL_TLS_CA=$data/tls/ca.pem SHOAL_TLS_CERT=$data/tls/client.pem \
      SHOAL_TLS_KEY=$data/tls/client.key SHOAL_API_KEY_FILE=$data/keys/root.key
  fi
  trap 'kill -TERM $SHOAL_DEV_PID 2>/dev/null; wait $SHOAL_DEV_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    if "$shoal" status 2>/dev/null | grep -c '"state": "up"' | grep -q 2; then return 0; fi
    sleep 0.5
  done
  echo "shoal dev: the nodes are not up after 60 s (logs under $data/logs)" >&2
  return 1
}

# Installs Debian packages (as root, or through sudo), saying which; $1 names the caller.
apt_install() {
  local who=$1
  shift
  echo "$who: installing $*" >&2
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
