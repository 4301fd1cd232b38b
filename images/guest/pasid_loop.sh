#!/bin/sh
# vioasid guest PASID DMA job loop (busybox), for live migration:
#   usage pasid_loop.sh DISK [MAX] [EXTRA]
# Binds one PASID per function (/sys/class/vioasid-dma/dmaN; every type present), maps a 64 KiB
# window of each read-write, then runs rounds until DISK's stop sector says so (the host's
# images.guest.patterns.request_stop) or MAX rounds (0: no limit). Each round, on every
# function: random data (random length 1..16384, random source offset) copied by the device
# through that function's PASID, read back and compared in the guest. EXTRA more PASIDs are
# bound (round robin over the functions, no jobs) before the loop, for bigger migrations.
# Lines (markers.py):
#   VIOASID-PASID-BIND dev=dmaN pasid=P
#   VIOASID-PASID-LOOP-READY pasids=dma0:P,dma1:Q,... extra=N
#   VIOASID-PASID-JOB result=fail dev=dmaN pasid=P round=R detail=...    (only failures)
#   VIOASID-PASID-ROUND n=R ok=K failed=F                                  (after every round)
#   VIOASID-PASID-LOOP-DONE rounds=N ok=K failed=F
disk=$1 max=${2:-0} extra=${3:-0}
. "${0%/*}/dma_lib.sh"
work=/tmp/vioasid-loop
mkdir -p "$work"

devs="" pasids="" ready=""
for d in $(ls "$cls" 2>/dev/null); do
  if cmd "$d" bind; then
    case "$R" in
      "ok pasid="*) p=${R#ok pasid=} ;;
      *) echo "VIOASID-PASID-JOB result=fail dev=$d pasid=0 round=0 detail=bind:$R"; continue ;;
    esac
  else
    echo "VIOASID-PASID-JOB result=fail dev=$d pasid=0 round=0 detail=bind:$R"
    continue
  fi
  echo "VIOASID-PASID-BIND dev=$d pasid=$p"
  if ! cmd "$d" map "$p" 0 0x10000 rw; then
    echo "VIOASID-PASID-JOB result=fail dev=$d pasid=$p round=0 detail=map:$R"
    continue
  fi
  devs="$devs $d" pasids="$pasids $p" ready="$ready${ready:+,}$d:$p"
done
more=0 xdevs="" xps=""
while [ "$more" -lt "$extra" ] && [ -n "$devs" ]; do
  for d in $devs; do
    [ "$more" -lt "$extra" ] || break
    if cmd "$d" bind; then
      xdevs="$xdevs $d" xps="$xps ${R#ok pasid=}"
      more=$((more + 1))
    else
      echo "VIOASID-PASID-JOB result=fail dev=$d pasid=0 round=0 detail=extra-bind:$R"
      extra=0
    fi
  done
done
echo "VIOASID-PASID-LOOP-READY pasids=$ready extra=$more"

stopped() { [ -b "$disk" ] && sh /guest_tests/disk_tests.sh "$disk" stopcheck 0; }

ok=0 failed=0 round=0
while :; do
  round=$((round + 1))
  set -- $pasids
  for d in $devs; do
    p=$1
    shift
    len=$(($(rand 16384) + 1)) src=$(rand 16384) dst=$((32768 + $(rand 16384)))
    randfile "$len" "$work/in"
    put "$d" "$src" "$work/in"
    if cmd "$d" copy "$p" "$src" "$dst" "$len"; then
      get "$d" "$dst" "$len" "$work/out"
      if same "$work/in" "$work/out"; then
        ok=$((ok + 1))
      else
        failed=$((failed + 1))
        echo "VIOASID-PASID-JOB result=fail dev=$d pasid=$p round=$round detail=data-differs"
      fi
    else
      failed=$((failed + 1))
      echo "VIOASID-PASID-JOB result=fail dev=$d pasid=$p round=$round detail=$(echo $R | tr ' ' _)"
    fi
  done
  echo "VIOASID-PASID-ROUND n=$round ok=$ok failed=$failed"
  [ "$max" -gt 0 ] && [ "$round" -ge "$max" ] && break
  stopped && break
done
echo "VIOASID-PASID-LOOP-DONE rounds=$round ok=$ok failed=$failed"
set -- $pasids $xps
for d in $devs $xdevs; do
  cmd "$d" unbind "$1"
  shift
done
