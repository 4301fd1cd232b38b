#!/bin/sh
# vioasid guest PASID DMA figures (busybox), measured in the guest: usage pasid_bench.sh [SECONDS]
# On /sys/class/vioasid-dma/dma0, through one PASID with the whole buffer mapped, each figure
# runs for at least SECONDS (default 3) of guest time (/proc/uptime, 10 ms steps) and prints
#   VIOASID-PASID-BENCH name=<figure> value=<v> unit=<u> ops=<n> seconds=<s>
#   VIOASID-PASID-BENCH-DONE ok=1|0 [detail=<why not>]
# Figures: pasid_copy_1m_mib_s (1 MiB copies, one descriptor each), pasid_jobs_4k_per_s (4 KiB
# copies, 256 per batch descriptor, i.e. one doorbell; page i onto itself, the buffer being
# 1 MiB), pasid_jobs_4k_single_per_s (one 4 KiB copy per doorbell),
# pasid_jobs_4k_after_inval_per_s (unmap + map of the source page, an IOTLB invalidation in the
# guest, before every 4 KiB copy). Every result is checked (the write() fails on any error, and
# the data is compared once per figure).
secs=${1:-3}
. "${0%/*}/dma_lib.sh"
dev=dma0
c=$cls/$dev/cmd
work=/tmp/vioasid-bench
mkdir -p "$work"

fail() {
  echo "VIOASID-PASID-BENCH-DONE ok=0 detail=$1: $(cat "$c" 2>/dev/null)"
  rm -rf "$work"
  exit 1
}
figure() { # NAME OPS BYTES_PER_OP UNIT T0 T1
  cs=$(($6 - $5))
  [ "$cs" -gt 0 ] || cs=1
  if [ "$4" = MiB/s ]; then
    value=$(awk -v n="$2" -v b="$3" -v cs="$cs" 'BEGIN { printf "%.1f", n * b / 1048576 / (cs / 100) }')
  else
    value=$(awk -v n="$2" -v cs="$cs" 'BEGIN { printf "%.1f", n / (cs / 100) }')
  fi
  echo "VIOASID-PASID-BENCH name=$1 value=$value unit=$4 ops=$2 seconds=$(awk -v cs="$cs" 'BEGIN { printf "%.2f", cs / 100 }')"
}
# timed K WORDS...: repeat one driver command (K jobs each) for SECONDS; sets n, t0 and t1
timed() {
  _k=$1
  shift
  n=0
  clock_cs
  t0=$T
  while :; do
    echo "$*" > "$c" 2>/dev/null || fail "$1"
    n=$((n + _k))
    clock_cs
    t1=$T
    [ $((t1 - t0)) -ge "$lim" ] && break
  done
}
check() { # SRC DST LEN: the bytes arrived
  get "$dev" "$1" "$3" "$work/a"
  get "$dev" "$2" "$3" "$work/b"
  same "$work/a" "$work/b"
}

[ -e "$c" ] || fail "no $cls/$dev"
echo bind > "$c" 2>/dev/null || fail bind
P=$(cut -d= -f2 "$c")
echo "map $P 0 0x100000 rw" > "$c" 2>/dev/null || fail map
head -c 1048576 /dev/urandom > "/dev/vioasid-$dev" 2>/dev/null
lim=$((secs * 100))

# 1 MiB copies onto themselves (the buffer is 1 MiB): the device still reads and writes every
# byte through the PASID's translation.
echo "copy $P 0 0 0x100000" > "$c" 2>/dev/null || fail "copy 1m"
timed 1 copy "$P" 0 0 0x100000
figure pasid_copy_1m_mib_s "$n" 1048576 MiB/s "$t0" "$t1"
echo "copy $P 0 0x80000 0x80000" > "$c" 2>/dev/null || fail "copy half"
check 0 524288 524288 || fail "1 MiB copy data"

timed 256 batch 256 copy "$P" 0 0 4096
figure pasid_jobs_4k_per_s "$n" 4096 jobs/s "$t0" "$t1"
head -c 524288 /dev/urandom | dd of="/dev/vioasid-$dev" bs=4096 conv=notrunc 2>/dev/null
echo "batch 128 copy $P 0 0x80000 4096" > "$c" 2>/dev/null || fail "batch 128"
check 0 524288 524288 || fail "batch data"

timed 1 copy "$P" 0x1000 0x81000 4096
figure pasid_jobs_4k_single_per_s "$n" 4096 jobs/s "$t0" "$t1"

echo "unmap $P 0 4096" > "$c" 2>/dev/null || fail unmap
n=0
clock_cs
t0=$T
while :; do
  echo "map $P 0 4096 rw" > "$c" 2>/dev/null || fail remap
  echo "copy $P 0 0x80000 4096" > "$c" 2>/dev/null || fail "copy after inval"
  echo "unmap $P 0 4096" > "$c" 2>/dev/null || fail unmap
  n=$((n + 1))
  clock_cs
  t1=$T
  [ $((t1 - t0)) -ge "$lim" ] && break
done
figure pasid_jobs_4k_after_inval_per_s "$n" 4096 jobs/s "$t0" "$t1"
echo "map $P 0 4096 rw" > "$c" 2>/dev/null || fail remap
check 0 524288 4096 || fail "copy after inval data"

echo "unbind $P" > "$c" 2>/dev/null || fail unbind
echo "VIOASID-PASID-BENCH-DONE ok=1"
rm -rf "$work"
