#!/usr/bin/env bash
# cluster.sh: a throwaway Kubernetes control plane (etcd + kube-apiserver, no controllers, no
# scheduler, no kubelet) on 127.0.0.1, for npd's Kubernetes integration tests.
#
# Usage:
#   tests/k8s/cluster.sh up DIR               build/fetch kube-apiserver (cached, see
#                                             build-kube-apiserver.sh), start etcd and
#                                             kube-apiserver on free loopback ports, wait for
#                                             /readyz. A no-op when DIR's cluster is already up.
#   tests/k8s/cluster.sh down DIR             stop both; safe to repeat or after a failed `up`.
#   tests/k8s/cluster.sh stop-apiserver DIR   stop only kube-apiserver (simulated API outage).
#   tests/k8s/cluster.sh start-apiserver DIR  start it again, same port and flags; waits for
#                                             /readyz.
#
# What `up` leaves in DIR:
#   env                 shell-sourceable: APISERVER_URL APISERVER_PORT ETCD_PORT APISERVER_PID
#                       ETCD_PID (and ETCD_PEER_PORT CLUSTER_DIR KUBECONFIG_FILE CA_FILE
#                       ADMIN_TOKEN_FILE, and KUBECACHEDIR which, exported, keeps kubectl's
#                       discovery cache in DIR rather than ~/.kube). Source it by path
#                       (`. "$DIR/env"`): a bare `source env` runs bash's PATH lookup and
#                       finds /usr/bin/env. A PID is empty while that process is stopped.
#   kubeconfig          admin (group system:masters) via bearer token, CA embedded,
#                       server https://127.0.0.1:PORT
#   ca.crt admin-token  the CA that signed the serving certificate (SAN 127.0.0.1, localhost)
#                       and the admin bearer token
#   etcd.log kube-apiserver.log   process logs (appended to by start-apiserver)
#   kube-apiserver.cmd  the exact kube-apiserver command line (bash array), reused on restart
#   plus keys and certificates, tokens.csv, and etcd-data/ (which `down` removes; `down`
#   leaves the other files for inspection, and `up` regenerates them all).
#
# The API server is upstream v1.20.2 with RBAC (--authorization-mode=RBAC), the ServiceAccount
# admission plugin off, TokenRequest on, no insecure port and no endpoint reconciler. Progress
# and errors go to stderr; stdout stays empty. Environment: NPD_K8S_READY_TIMEOUT (seconds,
# default 60), NPD_CACHE (see build-kube-apiserver.sh).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_TIMEOUT=${NPD_K8S_READY_TIMEOUT:-60}
ETCD_TIMEOUT=30
STOP_TIMEOUT=20
SA_ISSUER=https://kubernetes.default.svc.cluster.local
SERVICE_CIDR=10.0.0.0/24

log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^#$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

(($# == 2)) || usage
command=$1
case $command in
up | down | stop-apiserver | start-apiserver) ;;
*) usage ;;
esac
[[ -n $2 ]] || usage
DIR=$(realpath -m -- "$2")

ENV_FILE=$DIR/env
CMD_FILE=$DIR/kube-apiserver.cmd
ETCD_LOG=$DIR/etcd.log
APISERVER_LOG=$DIR/kube-apiserver.log
TOKEN_FILE=$DIR/admin-token
CA_FILE=$DIR/ca.crt
KUBECONFIG_FILE=$DIR/kubeconfig

APISERVER_URL='' APISERVER_PORT='' ETCD_PORT='' ETCD_PEER_PORT='' APISERVER_PID='' ETCD_PID=''

# --- processes ----------------------------------------------------------------------------

# True when PID is a live (non-zombie) process running NAME with this DIR in its arguments,
# so a stale pid that was reused by something else is never signalled.
proc_matches() {
    local pid=$1 name=$2 comm args a
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # Builtins only (no forks): find_procs calls this for every process on the machine.
    IFS= read -r comm 2>/dev/null </proc/"$pid"/comm || return 1
    [[ $comm == "${name:0:15}" ]] || return 1
    mapfile -d '' -t args 2>/dev/null </proc/"$pid"/cmdline || return 1
    # A zombie has an empty command line.
    ((${#args[@]} > 0)) && [[ ${args[0]##*/} == "$name" ]] || return 1
    for a in "${args[@]:1}"; do
        [[ $a == *"$DIR/"* ]] && return 0
    done
    return 1
}

# Every live NAME process that belongs to DIR (also ones whose pid never reached the env file).
find_procs() {
    local p
    for p in /proc/[0-9]*; do
        if proc_matches "${p#/proc/}" "$1"; then echo "${p#/proc/}"; fi
    done
}

# SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL; returns once the process is gone.
stop_proc() {
    local pid=$1 name=$2 i
    proc_matches "$pid" "$name" || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        proc_matches "$pid" "$name" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        proc_matches "$pid" "$name" || return 0
        sleep 0.1
    done
    die "$name (pid $pid) survived SIGKILL"
}

stop_all() {
    local name=$1 pid=$2 p
    stop_proc "$pid" "$name"
    for p in $(find_procs "$name"); do stop_proc "$p" "$name"; done
}

# Starts "$@" in the background with its output appended to LOG; sets SPAWNED_PID. stdin and
# every other descriptor of ours (the DIR lock on fd 9, callers' pipes on 1 and 2) are
# detached so the process neither holds the lock nor keeps a caller's pipe open.
spawn() {
    local logf=$1
    shift
    (
        # etcd reads ETCD_* variables as flags: keep the caller's out of it.
        for v in $(compgen -e); do
            if [[ $v == ETCD_* ]]; then unset "$v"; fi
        done
        # etcd 3.4 supports only amd64 and ppc64le officially; elsewhere (arm64...) it
        # refuses to start unless ETCD_UNSUPPORTED_ARCH names the Go architecture.
        case $(dpkg --print-architecture 2>/dev/null) in
        amd64 | ppc64el | '') ;;
        i386) export ETCD_UNSUPPORTED_ARCH=386 ;;
        armhf | armel) export ETCD_UNSUPPORTED_ARCH=arm ;;
        *) ETCD_UNSUPPORTED_ARCH=$(dpkg --print-architecture) && export ETCD_UNSUPPORTED_ARCH ;;
        esac
        exec "$@" </dev/null >>"$logf" 2>&1 9<&-
    ) &
    SPAWNED_PID=$!
    # Until the subshell has exec'd, the pid does not look like NAME yet: wait for that (or
    # for the exec to fail), so later liveness checks cannot mistake it for a dead server.
    local name=${1##*/} i stat
    for ((i = 0; i < 200; i++)); do
        proc_matches "$SPAWNED_PID" "$name" && return 0
        stat=$(cat /proc/"$SPAWNED_PID"/stat 2>/dev/null) || return 0
        [[ ${stat##*) } == Z* ]] && return 0
        sleep 0.02
    done
}

log_tail() {
    log "last lines of $1:"
    tail -n "${2:-30}" "$1" 2>/dev/null | sed 's/^/    /' >&2 || true
}

# --- state files --------------------------------------------------------------------------

write_env() {
    local v tmp=$ENV_FILE.tmp
    {
        echo "# Written by tests/k8s/cluster.sh; source it from a shell."
        for v in APISERVER_URL APISERVER_PORT ETCD_PORT APISERVER_PID ETCD_PID ETCD_PEER_PORT; do
            printf '%s=%q\n' "$v" "${!v}"
        done
        printf 'CLUSTER_DIR=%q\n' "$DIR"
        printf 'KUBECONFIG_FILE=%q\n' "$KUBECONFIG_FILE"
        printf 'CA_FILE=%q\n' "$CA_FILE"
        printf 'ADMIN_TOKEN_FILE=%q\n' "$TOKEN_FILE"
        printf 'KUBECACHEDIR=%q\n' "$DIR/kubectl-cache"
    } >"$tmp"
    mv -f "$tmp" "$ENV_FILE"
}

load_env() {
    [[ -f $ENV_FILE ]] || return 1
    # shellcheck source=/dev/null
    source "$ENV_FILE"
}

# --- readiness ----------------------------------------------------------------------------

readyz_ok() {
    local token
    token=$(cat "$TOKEN_FILE" 2>/dev/null) || return 1
    [[ $(curl -sS --max-time 3 --cacert "$CA_FILE" -H "Authorization: Bearer $token" \
        "$APISERVER_URL/readyz" 2>/dev/null) == ok ]]
}

# Waits for /readyz; on failure prints why and the log tail. Returns 2 when the server exited
# because its port was taken (the caller may retry with other ports).
wait_apiserver_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    while ! readyz_ok; do
        if ! proc_matches "$APISERVER_PID" kube-apiserver; then
            log "kube-apiserver (pid $APISERVER_PID) exited before becoming ready"
            log_tail "$APISERVER_LOG"
            grep -q 'address already in use' "$APISERVER_LOG" 2>/dev/null && return 2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "kube-apiserver at $APISERVER_URL not ready after ${READY_TIMEOUT}s"
            curl -sS --max-time 3 --cacert "$CA_FILE" \
                -H "Authorization: Bearer $(<"$TOKEN_FILE")" \
                "$APISERVER_URL/readyz?verbose" 2>&1 | grep -v '^\[+\]' | sed 's/^/    /' >&2 || true
            log_tail "$APISERVER_LOG"
            return 1
        fi
        sleep 0.25
    done
}

wait_etcd_ready() {
    local deadline=$((SECONDS + ETCD_TIMEOUT))
    until curl -sS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null |
        grep -q '"health":"true"'; do
        if ! proc_matches "$ETCD_PID" etcd; then
            log "etcd (pid $ETCD_PID) exited before becoming healthy"
            log_tail "$ETCD_LOG"
            grep -q 'address already in use' "$ETCD_LOG" 2>/dev/null && return 2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "etcd on 127.0.0.1:$ETCD_PORT not healthy after ${ETCD_TIMEOUT}s"
            log_tail "$ETCD_LOG"
            return 1
        fi
        sleep 0.1
    done
}

# --- ports --------------------------------------------------------------------------------

# True when some TCP socket (any address) uses local port $1: in any state, or with
# `listening` as $2, only a listening one (TIME_WAIT leftovers do not prevent a restart).
port_in_use() {
    local files=() f
    for f in /proc/net/tcp /proc/net/tcp6; do [[ -r $f ]] && files+=("$f"); done
    ((${#files[@]} > 0)) || return 1
    awk -v p="$(printf ':%04X' "$1")" -v listening="${2:-}" '
        FNR > 1 && substr($2, length($2) - 4) == p && (listening == "" || $4 == "0A") {
            found = 1
        }
        END { exit !found }' "${files[@]}"
}

# Picks a free port below the kernel's ephemeral range (so outgoing connections do not take
# it between the check and the bind) and different from the ones given as arguments.
pick_port() {
    local low port taken i
    low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    ((low > 21000)) || low=61000
    for ((i = 0; i < 1000; i++)); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % (low - 20000)))
        for taken in "$@"; do [[ $port == "$taken" ]] && continue 2; done
        port_in_use "$port" || {
            echo "$port"
            return 0
        }
    done
    die "no free loopback port found"
}

# --- certificates and credentials ---------------------------------------------------------

quiet() {
    local out
    out=$("$@" 2>&1) || {
        log "command failed: $*"
        printf '%s\n' "$out" | sed 's/^/    /' >&2
        return 1
    }
}

make_credentials() {
    local cnf=$DIR/openssl.cnf
    cat >"$cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = npd-test
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost
EOF
    (
        umask 077
        # ECDSA P-256 for the TLS keys (RSA key generation takes seconds on a busy machine);
        # the service-account signing key is RSA (RS256), as on real clusters.
        quiet openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -sha256 -days 3650 \
            -config "$cnf" -extensions v3_ca -subj /CN=npd-test-ca \
            -keyout "$DIR/ca.key" -out "$CA_FILE"
        quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -sha256 -config "$cnf" \
            -subj /CN=kube-apiserver -keyout "$DIR/apiserver.key" -out "$DIR/apiserver.csr"
        quiet openssl x509 -req -sha256 -days 3650 -in "$DIR/apiserver.csr" \
            -CA "$CA_FILE" -CAkey "$DIR/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
            -extfile "$cnf" -extensions v3_server -out "$DIR/apiserver.crt"
        quiet openssl genrsa -out "$DIR/sa.key" 2048
        quiet openssl rsa -in "$DIR/sa.key" -pubout -out "$DIR/sa.pub"
        openssl rand -hex 32 >"$TOKEN_FILE"
        printf '%s,npd-admin,npd-admin,"system:masters"\n' "$(<"$TOKEN_FILE")" >"$DIR/tokens.csv"
    )
    chmod 0644 "$CA_FILE" "$DIR/apiserver.crt" "$DIR/sa.pub"
    rm -f "$DIR/apiserver.csr"
}

write_kubeconfig() {
    local tmp=$KUBECONFIG_FILE.tmp
    (
        umask 077
        cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: npd-test
  cluster:
    server: "$APISERVER_URL"
    certificate-authority-data: "$(base64 -w0 "$CA_FILE")"
users:
- name: npd-admin
  user:
    token: "$(<"$TOKEN_FILE")"
contexts:
- name: npd-test
  context:
    cluster: npd-test
    user: npd-admin
current-context: npd-test
EOF
    )
    mv -f "$tmp" "$KUBECONFIG_FILE"
}

# --- commands -----------------------------------------------------------------------------

start_etcd() {
    rm -rf "$DIR/etcd-data"
    spawn "$ETCD_LOG" etcd \
        --name npd-test \
        --data-dir "$DIR/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "npd-test=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state new \
        --initial-cluster-token "npd-test-$ETCD_PORT" \
        --unsafe-no-fsync \
        --logger zap --log-outputs stderr
    ETCD_PID=$SPAWNED_PID
    write_env
    log "etcd pid $ETCD_PID on 127.0.0.1:$ETCD_PORT (peer $ETCD_PEER_PORT)"
}

start_apiserver() {
    spawn "$APISERVER_LOG" "${APISERVER_CMD[@]}"
    APISERVER_PID=$SPAWNED_PID
    write_env
    log "kube-apiserver pid $APISERVER_PID on $APISERVER_URL"
}

cmd_down() {
    if [[ ! -d $DIR ]]; then
        log "$DIR does not exist; nothing to stop"
        return 0
    fi
    load_env || true
    stop_all kube-apiserver "$APISERVER_PID"
    stop_all etcd "$ETCD_PID"
    APISERVER_PID='' ETCD_PID=''
    if [[ -f $ENV_FILE ]]; then write_env; fi
    rm -rf "$DIR/etcd-data"
    log "down: $DIR"
}

cmd_up() {
    mkdir -p "$DIR"
    if load_env && proc_matches "$ETCD_PID" etcd && proc_matches "$APISERVER_PID" kube-apiserver &&
        [[ -f $KUBECONFIG_FILE ]] && readyz_ok; then
        log "already up: $APISERVER_URL (pids: kube-apiserver $APISERVER_PID, etcd $ETCD_PID)"
        return 0
    fi
    cmd_down >/dev/null 2>&1 || true

    local apiserver_bin tool
    apiserver_bin=$("$SCRIPT_DIR/build-kube-apiserver.sh" </dev/null)
    apiserver_bin=${apiserver_bin##*$'\n'}
    [[ -x $apiserver_bin ]] || die "build-kube-apiserver.sh did not give a binary: '$apiserver_bin'"
    for tool in etcd openssl curl base64; do
        command -v "$tool" >/dev/null || die "$tool not found (see build-kube-apiserver.sh)"
    done

    # From here on, a failure stops whatever was started (logs stay in DIR for diagnosis).
    trap 'rc=$?; if ((rc != 0)); then log "up failed; cleaning up"; cmd_down || true; fi' EXIT

    local started=$SECONDS attempt rc
    rm -f "$DIR/kube-apiserver.cmd" "$KUBECONFIG_FILE" "$ENV_FILE"
    make_credentials
    for attempt in 1 2 3; do
        APISERVER_PORT=$(pick_port)
        ETCD_PORT=$(pick_port "$APISERVER_PORT")
        ETCD_PEER_PORT=$(pick_port "$APISERVER_PORT" "$ETCD_PORT")
        APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
        APISERVER_PID='' ETCD_PID=''
        write_env
        printf '=== %s: cluster.sh up (attempt %s)\n' "$(date -u +%FT%TZ)" "$attempt" \
            >"$ETCD_LOG"
        printf '=== %s: cluster.sh up (attempt %s)\n' "$(date -u +%FT%TZ)" "$attempt" \
            >"$APISERVER_LOG"

        start_etcd
        rc=0
        wait_etcd_ready || rc=$?
        if ((rc == 2 && attempt < 3)); then
            log "port clash; retrying with other ports"
            cmd_down >/dev/null 2>&1
            continue
        fi
        ((rc == 0)) || die "etcd did not start (log: $ETCD_LOG)"

        APISERVER_CMD=(
            "$apiserver_bin"
            --bind-address=127.0.0.1
            --advertise-address=127.0.0.1
            --secure-port="$APISERVER_PORT"
            --insecure-port=0
            --etcd-servers="http://127.0.0.1:$ETCD_PORT"
            --tls-cert-file="$DIR/apiserver.crt"
            --tls-private-key-file="$DIR/apiserver.key"
            --cert-dir="$DIR/cert-dir"
            --client-ca-file="$CA_FILE"
            --token-auth-file="$DIR/tokens.csv"
            --service-account-key-file="$DIR/sa.pub"
            --service-account-signing-key-file="$DIR/sa.key"
            --service-account-issuer="$SA_ISSUER"
            --api-audiences="$SA_ISSUER"
            --authorization-mode=RBAC
            --service-cluster-ip-range="$SERVICE_CIDR"
            --endpoint-reconciler-type=none
            --disable-admission-plugins=ServiceAccount
            --profiling=false
        )
        {
            echo "# kube-apiserver command line written by tests/k8s/cluster.sh up;"
            echo "# start-apiserver sources this file and runs \"\${APISERVER_CMD[@]}\"."
            declare -p APISERVER_CMD | sed 's/^declare -a /declare -ga /'
        } >"$CMD_FILE"
        write_kubeconfig

        start_apiserver
        rc=0
        wait_apiserver_ready || rc=$?
        if ((rc == 2 && attempt < 3)); then
            log "port clash; retrying with other ports"
            cmd_down >/dev/null 2>&1
            continue
        fi
        ((rc == 0)) || die "kube-apiserver did not become ready (log: $APISERVER_LOG)"
        break
    done
    trap - EXIT
    log "up in $((SECONDS - started))s: $APISERVER_URL (kubeconfig: $KUBECONFIG_FILE)"
}

cmd_stop_apiserver() {
    load_env || die "no cluster in $DIR (no $ENV_FILE)"
    stop_all kube-apiserver "$APISERVER_PID"
    APISERVER_PID=''
    write_env
    log "kube-apiserver stopped; etcd (pid $ETCD_PID) still running"
}

cmd_start_apiserver() {
    load_env || die "no cluster in $DIR (no $ENV_FILE); run 'up' first"
    [[ -f $CMD_FILE ]] || die "no $CMD_FILE; run 'up' first"
    # shellcheck source=/dev/null
    source "$CMD_FILE"
    if proc_matches "$APISERVER_PID" kube-apiserver; then
        log "kube-apiserver already running (pid $APISERVER_PID)"
    else
        proc_matches "$ETCD_PID" etcd || die "etcd is not running; run 'down' and 'up' again"
        # A server of ours on this port was stopped above or by stop-apiserver; anything
        # still listening there is someone else's.
        local i
        for ((i = 0; i < 50; i++)); do
            port_in_use "$APISERVER_PORT" listening || break
            sleep 0.1
        done
        if port_in_use "$APISERVER_PORT" listening; then
            die "port $APISERVER_PORT is taken by another process; run 'down' and 'up' again"
        fi
        printf '=== %s: cluster.sh start-apiserver\n' "$(date -u +%FT%TZ)" >>"$APISERVER_LOG"
        start_apiserver
    fi
    local started=$SECONDS
    if ! wait_apiserver_ready; then
        stop_all kube-apiserver "$APISERVER_PID"
        APISERVER_PID=''
        write_env
        die "kube-apiserver did not become ready again (log: $APISERVER_LOG)"
    fi
    log "kube-apiserver ready again in $((SECONDS - started))s: $APISERVER_URL"
}

# One command at a time per DIR. The lock is on DIR itself; spawned servers do not inherit it.
if [[ $command == down && ! -d $DIR ]]; then
    cmd_down
    exit 0
fi
mkdir -p "$DIR"
exec 9<"$DIR"
flock 9

case $command in
up) cmd_up ;;
down) cmd_down ;;
stop-apiserver) cmd_stop_apiserver ;;
start-apiserver) cmd_start_apiserver ;;
esac
