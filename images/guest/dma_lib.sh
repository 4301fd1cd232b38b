#!/bin/sh
# Shell helpers the guest's PASID DMA scripts share (busybox sh; sourced, never run):
# pasid_tests.sh, seed_tests.sh, pasid_bench.sh and pasid_loop.sh drive the vioasid_dma driver
# (docs/pasid-dma.md, "Guest driver contract") through these.
cls=/sys/class/vioasid-dma
BUF=1048576 # each function's buffer, /dev/vioasid-dmaN

# cmd DEV WORDS...: one driver command; R = the result line; status = the write()'s
cmd() {
  _d=$1
  shift
  echo "$*" 2>/dev/null > "$cls/$_d/cmd"
  _rc=$?
  R=$(cat "$cls/$_d/cmd")
  return $_rc
}

hex() { printf '0x%x' "$1"; }
rand() { echo $(($(od -An -N4 -tu4 /dev/urandom) % $1)); }
randfile() { head -c "$1" /dev/urandom > "$2"; }
same() { cmp -s "$1" "$2"; }
# clock_cs: guest uptime in centiseconds into $T, with shell builtins only: a $(...) subshell
# with cut and tr is three processes, tens of milliseconds under TCG, too much in a timed loop
clock_cs() {
  read -r _up _ </proc/uptime
  T=${_up%.*}${_up#*.}
}
uptime_s() { cut -d. -f1 /proc/uptime; }

# put DEV OFF FILE / get DEV OFF LEN FILE: the function's buffer through /dev/vioasid-dmaN
put() { dd if="$3" of="/dev/vioasid-$1" bs=4096 oflag=seek_bytes seek="$2" conv=notrunc 2>/dev/null; }
get() {
  dd if="/dev/vioasid-$1" of="$4" bs=4096 iflag=skip_bytes,count_bytes skip="$2" count="$3" \
    2>/dev/null
}
