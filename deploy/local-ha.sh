#!/usr/bin/env bash
# Portway past one machine, started on one machine for trying (no containers):
#
#   3 etcd members ─ 2 API servers (portway apiserver --etcd-servers) ─ nginx :6443
#   2 operators, 2 DNS servers (--leader-elect: one writes, the other stands by)
#   2 relays (every endpoint is given both), 2 built-in edges (each its own gateway
#   identity) ─ nginx :8080
#
# Usage: deploy/local-ha.sh [DIR]   (needs etcd, nginx with its stream module, openssl;
#        Debian: apt-get install etcd-server nginx libnginx-mod-stream openssl)
# PORTWAY=path/to/portway overrides the binary. Ctrl-C stops everything; DIR keeps the
# data, certificates, kubeconfig and logs (DIR/*.log).
set -euo pipefail

BIN=${PORTWAY:-portway}
DIR=${1:-$(mktemp -d -t portway-ha.XXXX)}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
ETCD=${ETCD:-/usr/bin/etcd}
NGINX=${NGINX:-/usr/sbin/nginx}
STREAM=/usr/lib/nginx/modules/ngx_stream_module.so
for tool in "$ETCD" "$NGINX" openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
[ -f "$STREAM" ] || { echo "missing nginx's stream module ($STREAM): apt-get install libnginx-mod-stream" >&2; exit 1; }
command -v "$BIN" >/dev/null || { echo "missing portway binary: set PORTWAY=target/release/portway" >&2; exit 1; }

pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "stopped; data and logs are in $DIR"
}
trap stop EXIT INT TERM

# run NAME CMD... : in the background, logging to DIR/NAME.log.
run() {
  local name=$1; shift
  "$@" >"$DIR/$name.log" 2>&1 &
  pids+=($!)
}

# wait_for FILE: until a ready file (JSON) exists, or 60 s.
wait_for() {
  for _ in $(seq 600); do [ -s "$1" ] && return 0; sleep 0.1; done
  echo "timed out waiting for $1; see the logs in $DIR" >&2; exit 1
}

# 1. etcd, three members, with etcd's default limits (the API servers fit their writes).
cluster=m0=http://127.0.0.1:12380,m1=http://127.0.0.1:22380,m2=http://127.0.0.1:32380
for i in 0 1 2; do
  port=$((i * 10000 + 12379))
  run "etcd-$i" "$ETCD" --name "m$i" --data-dir "$DIR/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token portway-ha
done
ETCD_SERVERS=http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379

# 2. One serving certificate and one tokens file for both API servers.
if [ ! -f "$DIR/api.crt" ]; then
  ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
  openssl req -x509 $ec -days 365 -subj /CN=portway-ha-ca \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
  openssl req $ec -subj /CN=portway-api -keyout "$DIR/api.key" -out "$DIR/api.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$DIR/api.ext"
  openssl x509 -req -in "$DIR/api.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" -CAcreateserial \
    -days 365 -extfile "$DIR/api.ext" -out "$DIR/api.crt" 2>/dev/null
  echo "$(openssl rand -hex 24),admin,admin,*" >"$DIR/tokens.csv"
  chmod 600 "$DIR/ca.key" "$DIR/api.key" "$DIR/tokens.csv"
fi
TOKEN=$(cut -d, -f1 "$DIR/tokens.csv" | head -1)

for i in 1 2; do
  rm -f "$DIR/api-$i.json"
  run "api-$i" "$BIN" apiserver --data "$DIR/api-$i" --listen "127.0.0.1:${i}6443" \
    --tls-cert "$DIR/api.crt" --tls-key "$DIR/api.key" --tokens "$DIR/tokens.csv" \
    --etcd-servers "$ETCD_SERVERS" --ready-file "$DIR/api-$i.json"
done
wait_for "$DIR/api-1.json"; wait_for "$DIR/api-2.json"

# 3. nginx: the API servers on :6443, the edges on :8080 (telling them each client's
#    address with the PROXY protocol); a replica that refuses connections is skipped.
cat >"$DIR/nginx.conf" <<EOF
load_module $STREAM;
daemon off;
pid $DIR/nginx.pid;
error_log $DIR/nginx.log warn;
events {}
stream {
  upstream api { server 127.0.0.1:16443 max_fails=1 fail_timeout=5s; server 127.0.0.1:26443 max_fails=1 fail_timeout=5s; }
  upstream edges { server 127.0.0.1:18080 max_fails=1 fail_timeout=5s; server 127.0.0.1:28080 max_fails=1 fail_timeout=5s; }
  server { listen 127.0.0.1:6443; proxy_pass api; proxy_connect_timeout 1s; }
  # Each connection to an edge starts with a PROXY header naming the client.
  server { listen 127.0.0.1:8080; proxy_pass edges; proxy_connect_timeout 1s; proxy_protocol on; }
}
EOF
run nginx "$NGINX" -c "$DIR/nginx.conf" -p "$DIR"
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6443) 2>/dev/null && break; sleep 0.1; done

cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: portway
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: $(base64 -w0 <"$DIR/ca.crt")
users:
- name: admin
  user:
    token: $TOKEN
contexts:
- name: portway
  context: {cluster: portway, user: admin, namespace: default}
current-context: portway
EOF
chmod 600 "$DIR/kubeconfig"
KC=$DIR/kubeconfig

# 4. Two relays (a device moves home to the other when its own dies), two DNS servers and
#    two operators (leader-elected).
rm -f "$DIR"/*-ready.json
for i in 1 2; do
  run "relay-$i" "$BIN" relay --listen "127.0.0.1:${i}3340" --kubeconfig "$KC" --ready-file "$DIR/relay-$i-ready.json"
done
RELAYS="--relay http://127.0.0.1:13340/ --relay http://127.0.0.1:23340/"
for i in 1 2; do
  run "dns-$i" "$BIN" dns --kubeconfig "$KC" --listen "127.0.0.1:${i}5353" --leader-elect \
    --ready-file "$DIR/dns-$i-ready.json"
  run "operator-$i" "$BIN" operator --kubeconfig "$KC" --sidecar 127.0.0.1:4001 --leader-elect \
    --ready-file "$DIR/operator-$i-ready.json"
done
wait_for "$DIR/relay-1-ready.json"; wait_for "$DIR/relay-2-ready.json"; wait_for "$DIR/dns-1-ready.json"

# 5. Two built-in edges, each its own gateway (identity) in the ConnectorClass.
for i in 1 2; do
  run "edge-$i" "$BIN" edge --kubeconfig "$KC" --name "edge-$i" --state-dir "$DIR/edge-$i" \
    $RELAYS --dns "127.0.0.1:${i}5353" --http "127.0.0.1:${i}8080" \
    --proxy-protocol-from 127.0.0.1/32 --ready-file "$DIR/edge-$i-ready.json"
done
wait_for "$DIR/edge-1-ready.json"; wait_for "$DIR/edge-2-ready.json"

cat <<EOF
Portway is up in $DIR:
  API (2 replicas on 3 etcd members):  kubectl --kubeconfig $KC get connectors -A
  edges (2, behind nginx):             http://127.0.0.1:8080/
  leaders:                             kubectl --kubeconfig $KC get leases -n portway-system
Publish a local port (a device joining with a one-use token):
  T=\$($BIN token create --project default --kubeconfig $KC)
  $BIN agent --kubeconfig $KC --join-token \$T --project default $RELAYS \\
    --state-dir $DIR/device --tunnel web=127.0.0.1:3000,http,web.portway.localhost
  curl -H 'Host: web.portway.localhost' http://127.0.0.1:8080/
Try losing parts: kill -9 one etcd member, one API server, the leading operator, one edge.
Ctrl-C stops everything.
EOF
wait
