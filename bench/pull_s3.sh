#!/usr/bin/env bash
# `moat pull s3://…` throughput against moto's S3 server on loopback, and a
# reference client in the same run: boto3's managed transfer
# (`download_file`, s3transfer: the engine under `aws s3 cp`), fetching the
# same objects with the same parallelism. moto is a Python server and is
# the bottleneck for both clients: the figures compare clients under the
# same (slow) server, not moat against real S3.
#   bench/pull_s3.sh [FILES] [MB_PER_FILE]    (default 4 × 64 MB)
# MOAT_BIN=path skips the release build.
source "$(dirname "$0")/common.sh"
nfiles="${1:-4}"; mb="${2:-64}"
VENV="${MOAT_TEST_VENV:-$HOME/.cache/moat/venv}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/requirements-test.txt"
if [ -n "${MOAT_BIN:-}" ]; then MOAT="$MOAT_BIN"; else build_release; fi
port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$WORK/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.2; done
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
mkdir -p "$WORK/src"
# Valid safetensors shards (random F32 data) so the scan passes as it would
# for a real model.
"$VENV/bin/python" - "$WORK/src" "$nfiles" "$mb" <<'PY'
import json, os, struct, sys
out, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = mb << 20
for i in range(1, n + 1):
    header = json.dumps({f"w{i}": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(os.path.join(out, f"model-{i:05d}-of-{n:05d}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(os.urandom(size))
PY
"$VENV/bin/python" - "$WORK/src" <<'PY'
import boto3, os, sys
s3 = boto3.client("s3")
s3.create_bucket(Bucket="bench")
for f in sorted(os.listdir(sys.argv[1])):
    s3.upload_file(os.path.join(sys.argv[1], f), "bench", "model/" + f)
PY
bytes=$(cat "$WORK/src/"* | wc -c)
cat >"$WORK/moat.toml" <<TOML
[sources]
[[sources.allow]]
scheme = "s3"
host = "127.0.0.1"
allow_http = true
allow_private = true
TOML
calc() { awk "BEGIN { print $1 }"; }
runs="${RUNS:-3}"
t_moat=(); t_ref=()
for r in $(seq "$runs"); do
  rm -rf "$WORK/store"
  s=$(date +%s.%N)
  "$MOAT" pull s3://bench/model --name bench --store "$WORK/store" --config "$WORK/moat.toml" --jobs 4 --progress none >/dev/null
  e=$(date +%s.%N); t_moat+=("$(calc "$e - $s")")
  rm -rf "$WORK/ref"; mkdir -p "$WORK/ref"
  s=$(date +%s.%N)
  "$VENV/bin/python" - "$WORK/ref" <<'PY'
import boto3, sys
from concurrent.futures import ThreadPoolExecutor
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bench", Prefix="model/")["Contents"]]
cfg = TransferConfig(max_concurrency=4)
with ThreadPoolExecutor(4) as ex:
    list(ex.map(lambda k: s3.download_file("bench", k, sys.argv[1] + "/" + k.split("/")[-1], Config=cfg), keys))
PY
  e=$(date +%s.%N); t_ref+=("$(calc "$e - $s")")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
tm=$(median "${t_moat[@]}"); tr=$(median "${t_ref[@]}")
mbps() { printf '%.0f' "$(calc "$bytes / $1 / 1000000")"; }
echo "files: $nfiles x $mb MiB ($bytes bytes), moto on loopback, $(nproc) cores, median of $runs"
printf 'moat pull (hash+scan+promote) %6.2f s  %6s MB/s\n' "$tm" "$(mbps "$tm")"
printf 'boto3 download_file           %6.2f s  %6s MB/s\n' "$tr" "$(mbps "$tr")"
printf 'ratio moat/boto3 throughput   %6.2f\n' "$(calc "$tr / $tm")"
