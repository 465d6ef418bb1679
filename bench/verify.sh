#!/usr/bin/env bash
# `moat verify` throughput on the r1-distill-qwen-1.5b demo preset (bf16,
# 2 shards, 3.55 GB), against sha256sum and a plain read of the same files,
# in the same run, warm page cache, median of RUNS (default 5).
#   bench/verify.sh [DTYPE]   (bf16 default; f32 gives 4 shards, 7.1 GB)
source "$(dirname "$0")/common.sh"
dtype="${1:-bf16}"
build_release
store="$WORK/store"
name="r1-$dtype"
if [ ! -d "$store/models/$name" ]; then
  "$MOAT" demo-model "$WORK/src-$name" --preset r1-distill-qwen-1.5b --dtype "$dtype" --seed 1 >/dev/null
  "$MOAT" pull "file://$WORK/src-$name" --name "$name" --store "$store"
fi
# The active version folder: its files are hard links to the blobs.
files=("$store/models/$name/versions/$(cat "$store/models/$name/current")/files/"*)
bytes=$(cat "${files[@]}" | wc -c)
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
calc() { awk "BEGIN { print $1 }"; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); calc "$e - $s"; }
cat "${files[@]}" >/dev/null  # warm the page cache
runs="${RUNS:-5}"
t_moat=$(for _ in $(seq "$runs"); do timeit "$MOAT" verify "$name" --store "$store"; done | median)
t_sha=$(for _ in $(seq "$runs"); do timeit sha256sum "${files[@]}"; done | median)
# Raw read reference: read() into a user buffer, as moat does (GNU cat may
# splice to /dev/null without copying, which is not a read).
readall() { for f in "$@"; do dd if="$f" of=/dev/null bs=1M status=none; done; }
t_cat=$(for _ in $(seq "$runs"); do timeit readall "${files[@]}"; done | median)
t_gcat=$(for _ in $(seq "$runs"); do timeit cat "${files[@]}"; done | median)
mbps() { printf '%.0f' "$(calc "$bytes / $1 / 1000000")"; }
echo "files: ${#files[@]}, $bytes bytes ($dtype), $(nproc) cores, median of $runs"
printf 'moat verify   %6.2f s  %6s MB/s\n' "$t_moat" "$(mbps "$t_moat")"
printf 'sha256sum     %6.2f s  %6s MB/s   (moat/sha256sum speed-up %.2fx)\n' "$t_sha" "$(mbps "$t_sha")" "$(calc "$t_sha / $t_moat")"
printf 'dd bs=1M      %6.2f s  %6s MB/s   (one reader; moat at %.0f%% of its speed)\n' "$t_cat" "$(mbps "$t_cat")" "$(calc "100 * $t_cat / $t_moat")"
printf 'cat >/dev/null %5.2f s  %6s MB/s   (moat at %.0f%% of its speed)\n' "$t_gcat" "$(mbps "$t_gcat")" "$(calc "100 * $t_gcat / $t_moat")"
echo "(scratch folder: $WORK)"
