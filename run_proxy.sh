#!/usr/bin/env bash
# agentgate bootstrap: find Python >= 3.12, keep .venv in sync with setup.cfg, make the
# interception CA, then run the gateway (mitmdump / mitmweb), the tests, the demo or the CLI.
#
#   ./run_proxy.sh [mitmproxy args…]        gateway under mitmdump on 127.0.0.1:8080
#   ./run_proxy.sh web [mitmproxy args…]    the same under mitmweb (UI on 127.0.0.1:8082)
#   ./run_proxy.sh web -r FILE.mitm         open saved flows read-only (no proxy, no suite, no recording)
#   ./run_proxy.sh test [pytest args…]      the whole test suite
#   ./run_proxy.sh demo                     a real LangGraph agent through the gateway
#   ./run_proxy.sh dev                      local trial: dev IdP + stand-in + gateway (Ctrl-C stops)
#   ./run_proxy.sh bench [args…]            benchmarks (writes BENCHMARKS.md)
#   ./run_proxy.sh cli ARGS…                the agentgate command (rules check, token verify…)
#   ./run_proxy.sh replicas [N] [-- args…]  N gateways (default 2) behind HAProxy on AGENTGATE_LISTEN,
#                                           approvals shared in $AGENTGATE_STATE (else a throwaway postgres)
#                                           + one secret (placeholders restore on any replica) and one audit lake
#
# Env: AGENTGATE_LISTEN (host:port), AGENTGATE_RULES (dir), AGENTGATE_DATA (dir),
#      AGENTGATE_PYTHON (interpreter to use), AGENTGATE_VENV (virtualenv dir).
#      dev: AGENTGATE_DEV_IDP, AGENTGATE_DEV_UPSTREAM (loopback host:port of its IdP, stand-in).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
VENV=${AGENTGATE_VENV:-$ROOT/.venv}
LISTEN=${AGENTGATE_LISTEN:-127.0.0.1:8080}
RULES=${AGENTGATE_RULES:-$ROOT/rules}
DATA=${AGENTGATE_DATA:-$ROOT/data}
CERTS=$ROOT/certs

say() { printf 'agentgate: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

py_ok() { # is $1 a Python >= 3.12 that can make a venv?
  "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  if [[ -n ${AGENTGATE_PYTHON:-} ]]; then
    py_ok "$AGENTGATE_PYTHON" || die "AGENTGATE_PYTHON=$AGENTGATE_PYTHON is not a Python >= 3.12"
    echo "$AGENTGATE_PYTHON"; return
  fi
  local minor c p root
  root=$( (command -v pyenv >/dev/null && pyenv root) 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
  # 3.13 is preferred wherever it is (PATH or pyenv): on 3.12 mitmproxy 12.2 pins
  # typing-extensions <= 4.14, which the test clients (pydantic) cannot share. A pyenv shim on
  # PATH may answer for a version other than its name, so versions are tried newest-preferred
  # first and each candidate is asked for its real version by py_ok.
  for minor in 3.13 3.14 3.12; do
    p=$(command -v "python$minor" 2>/dev/null) && py_ok "$p" \
      && [[ $("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$minor" ]] \
      && { echo "$p"; return; }
    if [[ -d $root/versions ]]; then
      for p in $(ls -d "$root"/versions/"$minor"* 2>/dev/null | sort -rV); do
        [[ -x $p/bin/python3 ]] && py_ok "$p/bin/python3" && { echo "$p/bin/python3"; return; }
      done
    fi
  done
  for c in python3 python; do
    p=$(command -v "$c" 2>/dev/null) || continue
    py_ok "$p" && { echo "$p"; return; }
  done
  die "no Python >= 3.12 found (looked on PATH for python3.13/3.14/3.12/python3 and in $root/versions). Install one (e.g. 'pyenv install 3.13') or set AGENTGATE_PYTHON."
}

ensure_venv() { # $1: extras ("" | demo | test)
  local extras=$1 want stamp
  if [[ ! -x $VENV/bin/python ]] || ! py_ok "$VENV/bin/python"; then
    local py; py=$(find_python)
    say "creating virtualenv $VENV with $("$py" -c 'import sys; print(sys.version.split()[0])') ($py)"
    rm -rf "$VENV"
    "$py" -m venv "$VENV"
  fi
  # A virtualenv another checkout installed itself into (AGENTGATE_VENV shared): its
  # `agentgate`, and every `addons` import of this checkout's mitmdump, would run that
  # checkout's code, and the pip run below would point it at this one behind its back.
  local theirs
  theirs=$(cd / && "$VENV/bin/python" -c 'import addons, pathlib; print(pathlib.Path(addons.__file__).resolve().parent.parent)' 2>/dev/null) || theirs=""
  if [[ -n $theirs && -f $theirs/run_proxy.sh && $theirs != "$(pwd -P)" ]]; then
    die "the virtualenv $VENV runs the agentgate of $theirs, not of this checkout ($ROOT): give this checkout its own (unset AGENTGATE_VENV: $ROOT/.venv)"
  fi
  want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
  stamp=$VENV/.agentgate-deps${extras:+-$extras}
  # dependencies already matching setup.cfg: no pip run at all
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    say "installing dependencies${extras:+ ($extras)} into $VENV …"
    # (this machine's pip config names local index folders that may not exist: drop that noise)
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
          -e ".${extras:+[$extras]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
      die "dependency installation failed (see pip output above)"
    fi
    echo "$want" > "$stamp"
    [[ -n $extras ]] && echo "$want" > "$VENV/.agentgate-deps"  # extras include the base
  fi
  ensure_bytecode
}

ensure_bytecode() {
  # Python reads a module's cached bytecode, but under PYTHONDONTWRITEBYTECODE (usual in
  # containers, set on CI machines) never writes it: every gateway and audit writer start
  # compiled all of addons/ again (measured: importing the gateway 0.85 -> 0.60 s of CPU
  # with it cached, its RSS after import 25 -> 20 MiB, the compiler's leftovers). pip
  # compiles what it installs, not this editable checkout: compiled here, a no-op while
  # fresh (~30 ms). A read-only checkout compiles at import as before.
  "$VENV/bin/python" -m compileall -q -x node_modules "$ROOT/addons" >/dev/null 2>&1 || true
}

ensure_ca() {
  mkdir -p "$CERTS"
  if [[ ! -f $CERTS/mitmproxy-ca.pem ]]; then
    say "generating the interception CA in $CERTS (private key stays here, never committed)"
    "$VENV/bin/python" - "$CERTS" <<'EOF'
import sys
from pathlib import Path
from mitmproxy.certs import CertStore
CertStore.from_store(Path(sys.argv[1]), "mitmproxy", 2048)
EOF
    chmod 600 "$CERTS"/mitmproxy-ca.pem "$CERTS"/mitmproxy-ca.p12 2>/dev/null || true
  fi
}

run_gateway() { # $1: mitmdump | mitmweb
  local tool=$1; shift
  ensure_venv ""
  ensure_ca
  mkdir -p "$DATA"
  local host=${LISTEN%:*} port=${LISTEN##*:}
  [[ $host != "$LISTEN" && $port =~ ^[0-9]+$ ]] || die "AGENTGATE_LISTEN must be host:port, got '$LISTEN'"
  # A listener already there: say which variable moves ours (mitmproxy's own hint names
  # --mode, which would leave the printed env block pointing at the taken address).
  "$VENV/bin/python" - "$host" "$port" <<'EOF' || die "$LISTEN is already in use (another gateway or program listens there): stop it, or choose another address with AGENTGATE_LISTEN=HOST:PORT"
import errno, socket, sys
host, port = sys.argv[1].strip("[]"), int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mitmproxy binds: TIME_WAIT is no listener
try:
    s.bind((host, port))
except OSError as e:
    sys.exit(1 if e.errno == errno.EADDRINUSE else 0)  # anything else: mitmproxy reports it
EOF
  # Refuse to start on bad rules, with the file, key and reason.
  "$VENV/bin/agentgate" rules check "$RULES" >&2 || die "not starting: fix the rules above"
  local ca=$CERTS/mitmproxy-ca-cert.pem c=http://127.0.0.1:8888
  cat >&2 <<EOF

agentgate: starting $tool on $LISTEN (rules: $RULES, data: $DATA)
Connect an agent (per-client table: docs/CONNECT.md). Next to the agent, the connector presents
a fresh token on every connection (--token-command "CMD" or --token-env VAR also work):
  $VENV/bin/agentgate connect --gateway http://$LISTEN --token-file /path/to/agent-token &   # listens on $c
In the agent's environment (no token in it; the gateway replaces the placeholder keys):
  export HTTPS_PROXY=$c
  export HTTP_PROXY=$c
  export SSL_CERT_FILE=$ca          # openai, anthropic, httpx, urllib, aiohttp
  export REQUESTS_CA_BUNDLE=$ca     # requests
  export CURL_CA_BUNDLE=$ca         # curl
  export NODE_EXTRA_CA_CERTS=$ca    # Node
  export OPENAI_API_KEY=sk-placeholder
  export ANTHROPIC_API_KEY=sk-ant-placeholder
  export NODE_OPTIONS="--import $ROOT/addons/connect/node/agentgate-proxy.mjs"   # Node < 24 (once: cd $ROOT/addons/connect/node && npm ci --omit=dev)
  export NODE_USE_ENV_PROXY=1       # Node >= 24
  # aiohttp only: ClientSession(trust_env=True)
Without the connector (token fixed for the process's life): HTTPS_PROXY=http://agent:\${OIDC_TOKEN}@$LISTEN

EOF
  export AGENTGATE_RULES=$RULES AGENTGATE_DATA=$DATA
  exec "$VENV/bin/$tool" -s "$ROOT/addons/gateway.py" \
    --listen-host "$host" --listen-port "$port" \
    --set confdir="$CERTS" \
    --set agentgate_rules="$RULES" --set agentgate_data="$DATA" \
    --set connection_strategy=lazy \
    "$@"
}

view_flows() { # mitmweb -r FILE without the gateway: nothing proxied, nothing re-recorded
  ensure_venv ""
  say "opening saved flows read-only: no proxy listener, the gateway's addons are not loaded"
  say "(the loaded flows are not recorded again; the audit DB is what 'agentgate audit' reads)"
  exec "$VENV/bin/mitmweb" --no-server --set confdir="$CERTS" "$@"
}

cmd=${1:-}
case $cmd in
  web)
    shift
    web_port=()
    for a in "$@"; do
      case $a in -r|--rfile|-r?*|--rfile=*) view_flows "$@" ;; esac
    done
    # mitmweb's UI defaults to 8081, where the reviewers' page listens: move the UI to
    # $AGENTGATE_WEB_PORT (8082) unless the caller chose a web_port.
    [[ " $* " == *web_port=* ]] || web_port=(--set "web_port=${AGENTGATE_WEB_PORT:-8082}")
    run_gateway mitmweb "${web_port[@]}" "$@" ;;
  test)
    shift
    ensure_venv test
    ensure_ca
    # two pytest-xdist workers (AGENTGATE_TEST_WORKERS), each given whole test files so a
    # module's shared gateway starts once, in collection order (tests/conftest.py puts the
    # files that take minutes first; xdist's own order, by test count, ran the netns soak
    # last and alone); ports come from disjoint per-worker slices
    # (addons/devkit/launch.free_port). Any -n/--dist/-p no:xdist of the caller's wins.
    par=(-n "${AGENTGATE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
    for a in "$@"; do
      case $a in -n|-n?*|--numprocesses*|--dist*|no:xdist|-pno:xdist) par=() ;; esac
    done
    exec "$VENV/bin/python" -m pytest "${par[@]}" "$@"
    ;;
  demo)
    shift
    ensure_venv demo
    exec "$VENV/bin/agentgate" demo "$@"
    ;;
  dev)
    shift
    ensure_venv demo
    exec "$VENV/bin/agentgate" dev "$@"
    ;;
  bench)
    shift
    ensure_venv test
    if ! command -v hey >/dev/null || ! command -v nginx >/dev/null; then
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing hey and nginx-light (load generator and fast upstream for the benchmarks)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey nginx-light) \
          >/dev/null 2>&1 || say "could not install hey/nginx-light; the report will say what is missing"
      else
        say "hey and nginx are needed for the end-to-end benchmark: apt-get install -y hey nginx-light"
      fi
    fi
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  cli)
    shift
    ensure_venv ""
    exec "$VENV/bin/agentgate" "$@"
    ;;
  replicas)
    shift
    ensure_venv ""
    ensure_ca
    mkdir -p "$DATA"
    exec "$VENV/bin/python" -m addons.devkit.replicas --listen "$LISTEN" --rules "$RULES" \
      --data "$DATA" --certs "$CERTS" "$@"
    ;;
  -h|--help|help)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'  # the header comment only
    ;;
  *) run_gateway mitmdump "$@" ;;
esac
