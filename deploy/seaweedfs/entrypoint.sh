#!/bin/sh
# Start SeaweedFS (master, volume, filer and S3 gateway in one process, data in /data) with one S3 identity,
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the workers use the same), create the buckets named by the
# s3:// URIs in MELANOMA_ARTIFACT_STORE and MELANOMA_SERVING__REGISTRY_URI (and S3_BUCKETS, space-separated),
# then touch /tmp/s3-ready (the compose healthcheck). The S3 port is 8333; the other ports stay inside.
set -eu

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (in .env: the S3 server's access key, see .env.example)}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY (in .env: a long random secret, see .env.example)}"

rm -f /tmp/s3-ready
umask 077
config=$(mktemp -d)/s3.json
cat >"$config" <<JSON
{"identities": [{"name": "melanoma",
  "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON

weed server -s3 -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port=8333 -s3.config="$config" \
  -volume.max=0 -master.volumeSizeLimitMB=64 -s3.port.iceberg=0 -s3.port.lance=0 &
weed_pid=$!
trap 'kill -TERM "$weed_pid" 2>/dev/null; wait "$weed_pid"; exit 0' TERM INT

buckets=${S3_BUCKETS:-}
for uri in "${MELANOMA_ARTIFACT_STORE:-}" "${MELANOMA_SERVING__REGISTRY_URI:-}"; do
  case "$uri" in s3://?*) bucket=${uri#s3://}; bucket=${bucket%%/*} ;; *) continue ;; esac
  case " $buckets " in *" $bucket "*) ;; *) buckets="$buckets $bucket" ;; esac
done

# Retried once a second while the servers start (two minutes at most, or until weed exits).
wait_for() {
  what=$1
  shift
  tries=0
  until "$@" >/dev/null 2>&1; do
    tries=$((tries + 1))
    kill -0 "$weed_pid" 2>/dev/null || { echo "s3-entrypoint: weed exited while waiting for $what" >&2; exit 1; }
    [ "$tries" -lt 120 ] || { echo "s3-entrypoint: no $what after 120 s" >&2; exit 1; }
    sleep 1
  done
}
s3_answers() {  # any HTTP answer (403 without credentials) means the gateway is up
  python3 -c 'import urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:8333/", timeout=2)
except urllib.error.HTTPError:
    pass'
}
listed() { echo "s3.bucket.list" | weed shell -master=127.0.0.1:9333 2>/dev/null | grep -qw -- "$1"; }
made() { echo "s3.bucket.create -name $1" | weed shell -master=127.0.0.1:9333 >/dev/null 2>&1; listed "$1"; }

wait_for "S3 gateway on port 8333" s3_answers
for bucket in $buckets; do
  wait_for "bucket $bucket" made "$bucket"
  echo "s3-entrypoint: bucket $bucket ready"
done
touch /tmp/s3-ready
wait "$weed_pid"
