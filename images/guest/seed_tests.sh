#!/bin/sh
# vioasid guest checks of the seed's systems (busybox): usage seed_tests.sh PARTS [SECONDS]
# PARTS is a comma list run in order (the host places the functions; docs/seed-demo.md):
#   types,enqcmd,trouble,legal,exhausted,cleanup,policy   the one-guest boot, functions
#       dma0 dedicated, dma1 translating, dma2 mdev, dma3 enqcmd (not translating),
#       dma4 enqcmd + translating, dma5 enqcmd mdev, dma6 mdev of a parent with 2 PASID bits
#   policy      the same workload on dma0/1/2/4 (the host boots it again under "global")
#   tenant      one mdev slice (dma0) of a parent another guest shares: bind, own-memory jobs,
#               a never-bound PASID, then random-data jobs for SECONDS (guest uptime)
# Drives vioasid_dma.ko (docs/pasid-dma.md) and prints, one line each:
#   VIOASID-SEED-STEP case=C dev=dmaN op=OP pasid=P rc=0|1 err=<strerror_with_underscores> detail=<result line>
#   VIOASID-SEED-JOBS case=C dev=dmaN pasid=P ok=N bad=M detail=<first problem>
#   VIOASID-SEED-DMESG case=C dev=dmaN detail=<the driver's dmesg line>
#   VIOASID-SEED-LOOP phase=start|progress|end jobs=N bad=M uptime=S
#   VIOASID-SEED-DONE parts=PARTS
# Data is checked here (random bytes through /dev/vioasid-dmaN, cmp); the host checks the
# pPASIDs, tags, tables and the engine's invariants against the design table.
parts=${1:-types}
seconds=${2:-20}
. "${0%/*}/dma_lib.sh"
work=/tmp/vioasid-seed
mkdir -p "$work"
bound="" # "dev:pasid ..." this script bound (cleanup unbinds them)

# step CASE DEV WORDS...: one driver command; prints its STEP marker; returns the write()'s status
step() {
  _c=$1 _d=$2
  shift 2
  echo "$*" 2> "$work/err" > "$cls/$_d/cmd"
  _rc=$?
  R=$(cat "$cls/$_d/cmd")
  _e=$(tr '\n' ' ' < "$work/err" | sed 's/.*: //; s/ *$//; s/ /_/g')
  echo "VIOASID-SEED-STEP case=$_c dev=$_d op=$1 pasid=${2:-0} rc=$_rc err=${_e:-none} detail=$R"
  if [ "$1" = bind ] && [ "$_rc" = 0 ]; then
    P=${R#ok pasid=}
    bound="$bound $_d:$P"
  fi
  return $_rc
}

# bindmap CASE DEV P: bind P and map the whole buffer read-write into its window
bindmap() {
  step "$1" "$2" bind $3 || return 1
  cmd "$2" map "$P" 0 "$BUF" rw || {
    echo "VIOASID-SEED-JOBS case=$1 dev=$2 pasid=$P ok=0 bad=1 detail=map: $R"
    return 1
  }
}

# onejob DEV P: one copy of random bytes (1 B .. 16 KiB, unaligned) through P, checked
onejob() {
  _len=$((1 + $(rand 16384)))
  _src=$(rand 400000)
  _dst=$((524288 + $(rand 400000)))
  randfile "$_len" "$work/a"
  put "$1" "$_src" "$work/a"
  cmd "$1" copy "$2" "$_src" "$_dst" "$_len" || { WHY="copy $_src $_dst $_len: $R"; return 1; }
  get "$1" "$_dst" "$_len" "$work/b"
  same "$work/a" "$work/b" || { WHY="copied bytes differ ($_src -> $_dst, $_len)"; return 1; }
}

# jobs CASE DEV P N: N checked random copies; one JOBS marker
jobs() {
  _ok=0 _bad=0 _i=0 WHY=""
  while [ $_i -lt "$4" ]; do
    if onejob "$2" "$3"; then _ok=$((_ok + 1)); else _bad=$((_bad + 1)); fi
    _i=$((_i + 1))
  done
  echo "VIOASID-SEED-JOBS case=$1 dev=$2 pasid=$3 ok=$_ok bad=$_bad detail=${WHY:-none}"
}

dmesg_of() { # CASE DEV PASID: the driver's last dmesg line about refusing that bind
  _l=$(dmesg | grep "bind pasid $3 refused" | tail -n 1)
  echo "VIOASID-SEED-DMESG case=$1 dev=$2 detail=${_l:-none}"
}

part_types() { # one vPASID (5) on each kind: the design table's rows 1, 2, 5
  bindmap dedicated dma0 5 && jobs dedicated dma0 5 4
  bindmap translating dma1 5 && jobs translating dma1 5 4
  bindmap mdev dma2 5 && jobs mdev dma2 5 4
}

part_enqcmd() { # the VM's global pPASID for 5, once, reused by both ENQCMD functions
  bindmap enqcmd-portal dma4 5 && jobs enqcmd-portal dma4 5 4
  bindmap enqcmd-portal dma5 5 && jobs enqcmd-portal dma5 5 4
  # vPASID 77 was never bound: not in the CPU PASID table, the portal refuses it
  step enqcmd-portal dma4 copy 77 0 4096 64
  step enqcmd-portal dma5 copy 77 0 4096 64
}

part_trouble() { # 5 is on dma0 (pPASID 5) and in the CPU table (5 -> G != 5): dma3 needs G == 5
  step trouble-case dma3 bind 5
  dmesg_of trouble-case dma3 5
  jobs trouble-case dma0 5 3
  jobs trouble-case dma4 5 2
}

part_legal() {
  # a translating ENQCMD function takes any global value: 6 on dma0 and dma4
  bindmap trouble-case-legal dma0 6 && jobs trouble-case-legal dma0 6 2
  bindmap trouble-case-legal dma4 6 && jobs trouble-case-legal dma4 6 2
  # a free global value: 9 is free in the global space, so the non-translating dma3 gets 9
  bindmap trouble-case-legal dma0 9 && jobs trouble-case-legal dma0 9 2
  bindmap trouble-case-legal dma3 9 && jobs trouble-case-legal dma3 9 2
}

part_exhausted() { # dma6's parent has 2 PASID bits: pPASIDs 1..3, the fourth bind is refused
  for p in 11 12 13; do bindmap exhausted dma6 $p; done
  step exhausted dma6 bind 14
  for p in 11 12 13; do jobs exhausted dma6 $p 1; done
}

part_cleanup() {
  for b in $bound; do cmd "${b%%:*}" unbind "${b#*:}"; done
  bound=""
  echo "VIOASID-SEED-STEP case=cleanup dev=all op=cleanup pasid=0 rc=0 err=none detail=ok"
}

part_policy() { # the same workload under either policy: the host compares the pPASIDs
  bindmap policy dma0 5 && jobs policy dma0 5 1
  bindmap policy dma1 5 && jobs policy dma1 5 1
  bindmap policy dma2 5 && jobs policy dma2 5 1
  bindmap policy dma4 5 && jobs policy dma4 5 1
  bindmap policy dma2 7 && jobs policy dma2 7 1
  bindmap policy dma0 7 && jobs policy dma0 7 1
}

part_tenant() { # one mdev slice of a shared parent
  bindmap shared-parent dma0 || return
  mine=$P
  jobs shared-parent dma0 "$mine" 3
  other=$((mine + 1))
  step shared-parent dma0 copy "$other" 0 4096 64 # never bound in this guest
  start=$(uptime_s)
  end=$((start + seconds))
  n=0 bad=0
  echo "VIOASID-SEED-LOOP phase=start jobs=0 bad=0 uptime=$start"
  while [ "$(uptime_s)" -lt "$end" ]; do
    if onejob dma0 "$mine"; then n=$((n + 1)); else bad=$((bad + 1)); fi
    [ $(((n + bad) % 4)) = 0 ] && echo "VIOASID-SEED-LOOP phase=progress jobs=$n bad=$bad uptime=$(uptime_s)"
  done
  echo "VIOASID-SEED-LOOP phase=end jobs=$n bad=$bad uptime=$(uptime_s) detail=${WHY:-none}"
  cmd dma0 unbind "$mine"
}

for part in $(echo "$parts" | tr ',' ' '); do
  case "$part" in
    types | enqcmd | trouble | legal | exhausted | cleanup | policy | tenant) "part_$part" ;;
    *) echo "VIOASID-SEED-STEP case=$part dev=none op=unknown pasid=0 rc=1 err=none detail=unknown part" ;;
  esac
done
echo "VIOASID-SEED-DONE parts=$parts"
