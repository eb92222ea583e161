#!/usr/bin/env bash
# Smoke-test the binaries from hack/build-binaries.sh: print versions, start etcd
# and minio on 127.0.0.1 (temp dirs, fixed test credentials), check health and a
# real S3 round trip; if juicefs + redis-server are present, also format + FUSE-mount
# a JuiceFS volume (redis and sqlite3 metadata) on that minio. Everything is stopped
# and removed on exit. Needs curl (>= 7.75 for --aws-sigv4); FUSE part needs root.
set -euo pipefail

BIN="$("$(dirname "${BASH_SOURCE[0]}")/build-binaries.sh" --print-dir)"
export PATH="${BIN}:${PATH}"
ACCESS_KEY=bento-test SECRET_KEY=bento-test-secret
WORK="$(mktemp -d)"
PIDS=()
MOUNTS=()
cleanup() {
  local m p
  for m in "${MOUNTS[@]}"; do juicefs umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "${WORK}"
}
trap cleanup EXIT

ok() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { # wait_http <url> <seconds>
  local i
  for ((i = 0; i < $2 * 5; i++)); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.2; done
  return 1
}
s3() { # SigV4-signed S3 request; curl 7.88 needs the payload hash header spelled out
  curl -fsS --aws-sigv4 "aws:amz:us-east-1:s3" --user "${ACCESS_KEY}:${SECRET_KEY}" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"
}

echo "== versions"
kube-apiserver --version
kube-controller-manager --version
kube-scheduler --version
kubectl version --client
etcd --version | sed -n 1p # not head: SIGPIPE + pipefail
minio --version | sed -n 1p
command -v mc >/dev/null && mc --version | sed -n 1p
command -v juicefs >/dev/null && juicefs --version
command -v helm >/dev/null && helm version --short

echo "== etcd"
EP="$(free_port)" PP="$(free_port)"
etcd --name smoke --data-dir "${WORK}/etcd" --listen-client-urls "http://127.0.0.1:${EP}" \
  --advertise-client-urls "http://127.0.0.1:${EP}" --listen-peer-urls "http://127.0.0.1:${PP}" \
  --initial-advertise-peer-urls "http://127.0.0.1:${PP}" --initial-cluster "smoke=http://127.0.0.1:${PP}" \
  >"${WORK}/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:${EP}/health" 30 || { tail -20 "${WORK}/etcd.log"; fail "etcd not healthy"; }
ok "etcd /health: $(curl -fsS "http://127.0.0.1:${EP}/health")"
curl -fsS -X POST "http://127.0.0.1:${EP}/v3/kv/put" -d '{"key":"c21va2U=","value":"b2s="}' >/dev/null
[[ "$(curl -fsS -X POST "http://127.0.0.1:${EP}/v3/kv/range" -d '{"key":"c21va2U="}')" == *'"value":"b2s="'* ]] &&
  ok "etcd v3 put/range round trip" || fail "etcd put/range"

echo "== minio"
MP="$(free_port)" CP="$(free_port)"
MINIO_ROOT_USER="${ACCESS_KEY}" MINIO_ROOT_PASSWORD="${SECRET_KEY}" MINIO_BROWSER=off \
  minio server --quiet --address "127.0.0.1:${MP}" --console-address "127.0.0.1:${CP}" "${WORK}/minio" \
  >"${WORK}/minio.log" 2>&1 &
PIDS+=($!)
S3="http://127.0.0.1:${MP}"
wait_http "${S3}/minio/health/ready" 60 || { tail -20 "${WORK}/minio.log"; fail "minio not ready"; }
ok "minio ${S3}/minio/health/live + /ready: $(curl -s -o /dev/null -w '%{http_code}' "${S3}/minio/health/live") $(curl -s -o /dev/null -w '%{http_code}' "${S3}/minio/health/ready")"
s3 -X PUT "${S3}/smoke" && s3 -X PUT --data-binary 'hello s3' "${S3}/smoke/hello.txt" &&
  [[ "$(s3 "${S3}/smoke/hello.txt")" == 'hello s3' ]] && ok "S3 create bucket / put / get (SigV4)" || fail "S3 round trip"
[[ "$(curl -s -o /dev/null -w '%{http_code}' "${S3}/smoke/hello.txt")" == 403 ]] && ok "anonymous GET denied (403)" || fail "auth not enforced"

if command -v juicefs >/dev/null && command -v redis-server >/dev/null; then
  echo "== juicefs (FUSE)"
  RP="$(free_port)"
  redis-server --port "${RP}" --bind 127.0.0.1 --save '' --appendonly no --dir "${WORK}" >"${WORK}/redis.log" 2>&1 &
  PIDS+=($!)
  for ((i = 0; i < 50; i++)); do redis-cli -p "${RP}" ping >/dev/null 2>&1 && break; sleep 0.2; done
  for meta in "redis://127.0.0.1:${RP}/1" "sqlite3://${WORK}/jfs-meta.db"; do
    vol="smoke${#MOUNTS[@]}" mnt="${WORK}/mnt${#MOUNTS[@]}"
    juicefs format --storage minio --bucket "${S3}/${vol}" --access-key "${ACCESS_KEY}" \
      --secret-key "${SECRET_KEY}" "${meta}" "${vol}" >"${WORK}/format.log" 2>&1 ||
      { tail -5 "${WORK}/format.log"; fail "juicefs format ${meta}"; }
    mkdir -p "${mnt}"
    juicefs mount -d --no-usage-report --cache-dir "${WORK}/cache" "${meta}" "${mnt}" >"${WORK}/mount.log" 2>&1 ||
      { tail -5 "${WORK}/mount.log"; fail "juicefs mount ${meta}"; }
    MOUNTS+=("${mnt}")
    grep -q " ${mnt} fuse.juicefs " /proc/mounts || fail "no fuse.juicefs mount at ${mnt}"
    head -c 5000000 /dev/urandom >"${WORK}/blob"
    cp "${WORK}/blob" "${mnt}/blob" && sync
    cmp -s "${WORK}/blob" "${mnt}/blob" || fail "read-back mismatch"
    juicefs umount "${mnt}" && juicefs mount -d --no-usage-report --cache-dir "${WORK}/cache" "${meta}" "${mnt}" >"${WORK}/mount.log" 2>&1
    cmp -s "${WORK}/blob" "${mnt}/blob" || fail "read-back after remount mismatch"
    objs="$(s3 "${S3}/${vol}?list-type=2&prefix=${vol}%2Fchunks%2F" | grep -o '<Key>' | wc -l)"
    ((objs > 0)) || fail "no chunk objects in bucket ${vol}"
    ok "juicefs ${meta%%://*}: format + FUSE mount + 5 MB write/remount/read, ${objs} chunk objects in minio"
  done
fi
echo "smoke test passed"
