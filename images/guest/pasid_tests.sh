#!/bin/sh
# vioasid guest PASID DMA checks (busybox): usage pasid_tests.sh [CHECKS]
# CHECKS is "all" (default) or a comma list of the names below. Drives the vioasid_dma driver
# (docs/pasid-dma.md, "Guest driver contract") on every /sys/class/vioasid-dma/dmaN and prints,
# one line each (format in images/guest/markers.py):
#   VIOASID-PASID-DEVICES count=N types=dma0:dedicated,dma1:mdev
#   VIOASID-PASID-BIND dev=dmaN pasid=P                     each PASID a check bound
#   VIOASID-PASID-TEST name=<check> result=pass|fail|skip dev=dmaN pasid=P [fault_*=...] detail=...
#   VIOASID-PASID-DONE passed=N failed=M skipped=K
# The last check ("reload") unloads and reloads the driver; it also runs with no function.
# Every result is checked here in the guest (buffer contents through /dev/vioasid-dmaN, result
# lines, fault addresses and vPASIDs); the host checks its own view against these lines.
checks=${1:-all}
. "${0%/*}/dma_lib.sh"
work=/tmp/vioasid-pasid
WIN=268435456 # 0x10000000: PASID P's window starts at IOVA P * WIN
mkdir -p "$work"
passed=0 failed=0 skipped=0

# bind DEV [P]: sets P (or fails); prints the BIND marker
bind() {
  cmd "$1" bind $2 || return 1
  case "$R" in
    "ok pasid="*) P=${R#ok pasid=} ;;
    *) return 1 ;;
  esac
  echo "VIOASID-PASID-BIND dev=$1 pasid=$P"
}

iova() { hex $(($1 * WIN + $2)); }

# bind_or_fail NAME: bind a PASID on D0 (P), or report NAME failed and return 1
bind_or_fail() { bind "$D0" || { result "$1" fail "$D0" 0 "bind: $R"; return 1; }; }

# bind_map NAME: bind_or_fail, then map the whole buffer read-write (p=P); 1 if either failed
bind_map() {
  bind_or_fail "$1" || return 1
  p=$P
  cmd "$D0" map "$p" 0 "$BUF" rw && return 0
  result "$1" fail "$D0" "$p" "map: $R"
  cleanup "$D0" "$p"
  return 1
}

# finish NAME WHAT: unbind p on D0, then NAME's verdict
finish() {
  cleanup "$D0" "$p"
  verdict "$1" "$D0" "$p" "$2"
}

# verdict NAME DEV PASID WHAT: NAME passed (WHAT) unless $detail says why it failed
verdict() {
  if [ -z "$detail" ]; then result "$1" pass "$2" "$3" "$4"; else result "$1" fail "$2" "$3" "$detail"; fi
}

# result NAME pass|fail|skip DEV PASID DETAIL (fault fields from $FAULT when set)
result() {
  case "$2" in
    pass) passed=$((passed + 1)) ;;
    skip) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
  echo "VIOASID-PASID-TEST name=$1 result=$2 dev=$3 pasid=$4${FAULT:+ $FAULT} detail=$5"
  FAULT=
}

# want_fault PASID ADDR WRITE: $R must be that fault; sets FAULT (marker fields)
want_fault() {
  case "$R" in
    "fault reason="*) ;;
    *) return 1 ;;
  esac
  set -- "$1" "$2" "$3" $R
  _reason=${5#reason=} _addr=${6#addr=} _pasid=${7#pasid=} _write=${8#write=}
  FAULT="fault_reason=$_reason fault_addr=$_addr fault_pasid=$_pasid fault_write=$_write"
  [ "$_pasid" = "$1" ] && [ "$_addr" = "$2" ] && [ "$_write" = "$3" ]
}

cleanup() { # DEV PASID...: unbind, ignoring the outcome
  _d=$1
  shift
  for _p in "$@"; do cmd "$_d" unbind "$_p"; done
}

want() { case ",$checks," in *",all,"* | *",$1,"*) return 0 ;; esac; return 1; }

devs=""
for p in "$cls"/dma*; do [ -e "$p/cmd" ] && devs="$devs ${p##*/}"; done
set -- $devs
ndev=$#
D0=${1:-none} D1=${2:-none}
types=""
for d in $devs; do types="$types${types:+,}$d:$(cat "$cls/$d/type")"; done
echo "VIOASID-PASID-DEVICES count=$ndev types=${types:-none}"

check_devices() {
  if [ "$ndev" -gt 0 ] && [ -c "/dev/vioasid-$D0" ]; then
    result devices pass "$D0" 0 "$ndev function(s): $types"
  else
    result devices fail none 0 "no /sys/class/vioasid-dma/dmaN with /dev/vioasid-dmaN"
  fi
}

check_syntax() { # the parser refuses what is not a command, with EINVAL and "error invalid"
  bad=""
  for c in "" "frobnicate" "bind x" "bind 1 2" "map 1 0 4096" "map 1 1 4096 rw" \
    "map 1 0 4096 rx" "copy 1 0 0" "copy 1 0 0x100000 1" "fill 1 0 1 256" \
    "batch 0 copy 1 0 0 1" "batch 257 copy 1 0 0 1" "unbind 0x100000" "compare 1 0 -1 2"; do
    if cmd "$D0" "$c"; then bad="$bad [$c: accepted]"; continue; fi
    case "$R" in "error invalid "*) ;; *) bad="$bad [$c: $R]" ;; esac
  done
  if [ -z "$bad" ]; then result syntax pass "$D0" 0 "14 bad commands refused"; else
    result syntax fail "$D0" 0 "$bad"; fi
}

check_bind_unbind() {
  bind_or_fail bind-unbind || return
  p1=$P
  [ "$p1" -gt 0 ] || { result bind-unbind fail "$D0" "$p1" "PASID $p1"; return; }
  cmd "$D0" unbind "$p1" || { result bind-unbind fail "$D0" "$p1" "unbind: $R"; return; }
  if cmd "$D0" unbind "$p1"; then
    result bind-unbind fail "$D0" "$p1" "a second unbind succeeded"
    return
  fi
  case "$R" in "error not-bound"*) ;; *)
    result bind-unbind fail "$D0" "$p1" "second unbind: $R"; return ;;
  esac
  bind "$D0" "$p1" || { result bind-unbind fail "$D0" "$p1" "rebind of $p1: $R"; return; }
  # a new PASID while p1 (given by value, so not reserved in the allocator) is bound
  bind "$D0" || { result bind-unbind fail "$D0" "$p1" "bind beside $p1: $R"; cleanup "$D0" "$p1"; return; }
  p2=$P
  cleanup "$D0" "$p2"
  [ "$p2" != "$p1" ] || { result bind-unbind fail "$D0" "$p1" "new PASID $p2 = bound $p1"; cleanup "$D0" "$p1"; return; }
  cmd "$D0" unbind "$p1" || { result bind-unbind fail "$D0" "$p1" "unbind: $R"; return; }
  result bind-unbind pass "$D0" "$p1" "bind, unbind, unbind refused (not-bound), rebind by value, a new one beside it"
}

check_copy() { # random data, unaligned offsets, multi-page lengths, 6 rounds
  bind_map copy || return
  detail=""
  for round in 1 2 3 4 5 6; do
    len=$((4096 + $(rand 61440)))   # 1..16 pages, any length
    src=$(($(rand 65536) * 7 % 458752 + 1))
    dst=$((524288 + $(rand 458752)))
    randfile "$len" "$work/a"
    put "$D0" "$src" "$work/a"
    get "$D0" $((dst - 1)) 1 "$work/pre"
    get "$D0" $((dst + len)) 1 "$work/post"
    if ! cmd "$D0" copy "$p" "$src" "$dst" "$len"; then
      detail="round $round copy $src $dst $len: $R"
      break
    fi
    get "$D0" "$dst" "$len" "$work/b"
    get "$D0" $((dst - 1)) 1 "$work/pre2"
    get "$D0" $((dst + len)) 1 "$work/post2"
    if ! same "$work/a" "$work/b"; then detail="round $round: copied bytes differ ($src -> $dst, $len)"; break; fi
    if ! same "$work/pre" "$work/pre2" || ! same "$work/post" "$work/post2"; then
      detail="round $round: bytes outside [$dst, +$len) changed"
      break
    fi
  done
  finish copy "6 random copies, unaligned, up to 16 pages"
}

check_fill() {
  bind_map fill || return
  detail=""
  for round in 1 2 3 4; do
    len=$((1 + $(rand 40000)))
    dst=$((1 + $(rand 900000)))
    byte=$((1 + $(rand 255)))
    oct=$(printf '%03o' "$byte")
    randfile $((len + 2)) "$work/a"
    put "$D0" $((dst - 1)) "$work/a"
    if ! cmd "$D0" fill "$p" "$dst" "$len" "$byte"; then detail="round $round fill: $R"; break; fi
    head -c 1 "$work/a" > "$work/want"
    head -c "$len" /dev/zero | tr '\000' "\\$oct" >> "$work/want"
    tail -c 1 "$work/a" >> "$work/want"
    get "$D0" $((dst - 1)) $((len + 2)) "$work/b"
    if ! same "$work/want" "$work/b"; then detail="round $round: fill $dst $len $byte wrong"; break; fi
  done
  finish fill "4 random fills, edges intact"
}

check_compare() {
  bind_map compare || return
  len=$((8192 + $(rand 20000)))
  a=$((3 + $(rand 100000))) b=$((600001 + $(rand 100000)))
  randfile "$len" "$work/a"
  put "$D0" "$a" "$work/a"
  put "$D0" "$b" "$work/a"
  detail=""
  cmd "$D0" compare "$p" "$a" "$b" "$len"
  [ "$R" = "ok equal=1" ] || detail="equal ranges: $R"
  mid=$((b + len / 2))
  get "$D0" "$mid" 1 "$work/x"
  printf '\001' > "$work/y"
  same "$work/x" "$work/y" && printf '\002' > "$work/y"
  put "$D0" "$mid" "$work/y"
  cmd "$D0" compare "$p" "$a" "$b" "$len"
  [ "$R" = "ok equal=0" ] || detail="$detail; one byte changed: $R"
  finish compare "equal=1 then equal=0 ($len bytes)"
}

check_isolation() { # PASID A's mapping is unreachable through PASID B
  bind "$D0" || { result isolation fail "$D0" 0 "bind A: $R"; return; }
  pa=$P
  bind "$D0" || { result isolation fail "$D0" "$pa" "bind B: $R"; cleanup "$D0" "$pa"; return; }
  pb=$P
  detail=""
  cmd "$D0" map "$pa" 0 65536 rw || detail="map A: $R"
  cmd "$D0" map "$pb" 65536 4096 rw || detail="$detail map B: $R"
  cmd "$D0" copy "$pa" 0 0x1000 64 || detail="$detail A's own copy: $R"
  if cmd "$D0" copy "$pb" "$pa:0" 65536 64; then
    detail="$detail B read A's IOVA $(iova "$pa" 0)"
  elif ! want_fault "$pb" "$(iova "$pa" 0)" 0; then
    detail="$detail B at A's IOVA: $R"
  fi
  cleanup "$D0" "$pa" "$pb"
  verdict isolation "$D0" "$pb" "PASID $pb faults at PASID $pa's IOVA"
}

check_ro_fault() {
  bind_or_fail ro-write-fault || return
  p=$P
  detail=""
  cmd "$D0" map "$p" 0 8192 ro || detail="map ro: $R"
  cmd "$D0" map "$p" 8192 4096 rw || detail="$detail map rw: $R"
  cmd "$D0" copy "$p" 16 8192 100 || detail="$detail read from ro: $R"
  if cmd "$D0" copy "$p" 8192 4100 64; then
    detail="$detail a write to a read-only page succeeded"
  elif ! want_fault "$p" "$(iova "$p" 4100)" 1; then
    detail="$detail write to ro: $R"
  fi
  finish ro-write-fault "write fault at $(iova "$p" 4100)"
}

check_unmapped_fault() {
  bind_or_fail unmapped-fault || return
  p=$P
  detail=""
  cmd "$D0" map "$p" 0 4096 rw || detail="map: $R"
  if cmd "$D0" copy "$p" 0x50010 0 32; then
    detail="$detail a read of an unmapped IOVA succeeded"
  elif ! want_fault "$p" "$(iova "$p" 0x50010)" 0; then
    detail="$detail unmapped read: $R"
  fi
  finish unmapped-fault "read fault at $(iova "$p" 0x50010)"
}

check_unbind_fault() {
  bind_or_fail unbind-fault || return
  p=$P
  detail=""
  cmd "$D0" map "$p" 0 8192 rw || detail="map: $R"
  cmd "$D0" copy "$p" 0 4096 64 || detail="$detail copy while bound: $R"
  randfile 64 "$work/a"
  put "$D0" 0 "$work/a"
  get "$D0" 4096 64 "$work/before"
  cmd "$D0" unbind "$p" || detail="$detail unbind: $R"
  if cmd "$D0" copy "$p" 0 4096 64; then
    detail="$detail a copy after unbind succeeded"
  else
    case "$R" in
      "fault "*) want_fault "$p" "$(iova "$p" 0)" 0 || want_fault "$p" "$(iova "$p" 0x100000)" 1 ||
        detail="$detail after unbind: $R" ;;
      "error not-bound"*) ;;
      *) detail="$detail after unbind: $R" ;;
    esac
  fi
  get "$D0" 4096 64 "$work/after"
  same "$work/before" "$work/after" || detail="$detail the buffer changed after unbind"
  verdict unbind-fault "$D0" "$p" "after unbind: $R"
}

check_remap() { # an IOVA remapped to another page is seen at once, 50 times (and unmap faults)
  bind_or_fail remap || return
  p=$P
  detail=""
  randfile 4096 "$work/pa"
  randfile 4096 "$work/pb"
  put "$D0" 0 "$work/pa"
  put "$D0" 4096 "$work/pb"
  cmd "$D0" map "$p" 8192 4096 rw || detail="map dst: $R"
  w=0x80000
  i=0
  while [ $i -lt 50 ] && [ -z "$detail" ]; do
    if [ $((i % 2)) = 0 ]; then page=0 want=$work/pa; else page=4096 want=$work/pb; fi
    cmd "$D0" map "$p" "$page" 4096 ro "$w" || { detail="round $i map: $R"; break; }
    cmd "$D0" copy "$p" "$w" 8192 4096 || { detail="round $i copy: $R"; break; }
    get "$D0" 8192 4096 "$work/got"
    same "$want" "$work/got" || { detail="round $i: the copy read a stale page"; break; }
    cmd "$D0" unmap "$p" "$w" 4096 || { detail="round $i unmap: $R"; break; }
    if cmd "$D0" copy "$p" "$w" 8192 16; then detail="round $i: read after unmap succeeded"; break; fi
    want_fault "$p" "$(iova "$p" "$w")" 0 || { detail="round $i after unmap: $R"; break; }
    FAULT=
    i=$((i + 1))
  done
  finish remap "50 remaps of $(iova "$p" "$w"), each seen at once"
}

check_shared() { # the same PASID on two functions
  if [ "$ndev" -lt 2 ]; then result shared-pasid skip "$D0" 0 "needs two functions"; return; fi
  bind_or_fail shared-pasid || return
  p=$P
  detail=""
  bind "$D1" "$p" || { result shared-pasid fail "$D1" "$p" "bind $p on $D1: $R"; cleanup "$D0" "$p"; return; }
  for d in "$D0" "$D1"; do
    cmd "$d" map "$p" 0 16384 rw || detail="$detail $d map: $R"
    randfile 5000 "$work/a-$d"
    put "$d" 10 "$work/a-$d"
    cmd "$d" copy "$p" 10 9000 5000 || detail="$detail $d copy: $R"
  done
  for d in "$D0" "$D1"; do
    get "$d" 9000 5000 "$work/b"
    same "$work/a-$d" "$work/b" || detail="$detail $d: wrong bytes"
  done
  cmd "$D0" unbind "$p" || detail="$detail unbind on $D0: $R"
  cmd "$D1" copy "$p" 10 9000 5000 || detail="$detail $D1 after $D0's unbind: $R"
  cleanup "$D1" "$p"
  verdict shared-pasid "$D1" "$p" "PASID $p on $D0 and $D1"
}

check_many() { # 100 PASIDs on one function, each with its own page and job
  n=100
  list="" detail=""
  k=0
  while [ $k -lt $n ]; do
    bind "$D0" || { detail="bind #$k: $R"; break; }
    list="$list $P"
    cmd "$D0" map "$P" $((k * 4096)) 4096 rw || { detail="map #$k: $R"; break; }
    cmd "$D0" fill "$P" $((k * 4096)) 64 $((k + 1)) || { detail="fill #$k: $R"; break; }
    k=$((k + 1))
  done
  if [ -z "$detail" ]; then
    k=0
    while [ $k -lt $n ]; do
      head -c 64 /dev/zero | tr '\000' "\\$(printf '%03o' $((k + 1)))" > "$work/want"
      get "$D0" $((k * 4096)) 64 "$work/got"
      same "$work/want" "$work/got" || { detail="PASID #$k's page holds other bytes"; break; }
      k=$((k + 1))
    done
  fi
  uniq=$(echo $list | tr ' ' '\n' | sort -u | wc -l)
  [ -n "$detail" ] || [ "$uniq" = $n ] || detail="only $uniq distinct PASIDs"
  cleanup "$D0" $list
  verdict many-pasids "$D0" "${list##* }" "$n PASIDs bound, one job each"
}

check_batch() {
  bind_or_fail batch || return
  p=$P
  detail=""
  cmd "$D0" map "$p" 0 "$BUF" rw || detail="map: $R"
  randfile 65536 "$work/a"
  put "$D0" 4096 "$work/a"
  cmd "$D0" batch 16 copy "$p" 4096 524288 4096 || detail="$detail batch: $R"
  [ -n "$detail" ] || [ "$R" = "ok jobs=16" ] || detail="batch result: $R"
  get "$D0" 524288 65536 "$work/b"
  same "$work/a" "$work/b" || detail="$detail batch copied wrong bytes"
  cmd "$D0" unmap "$p" $((524288 + 8 * 4096)) 4096 || detail="$detail unmap: $R"
  if cmd "$D0" batch 16 copy "$p" 4096 524288 4096; then
    detail="$detail a batch into an unmapped page succeeded"
  else
    want_fault "$p" "$(iova "$p" $((524288 + 8 * 4096)))" 1 || detail="$detail faulting batch: $R"
  fi
  finish batch "16 jobs per doorbell; job 9 faults at its page"
}

check_every_function() { # each function (each type) binds and copies
  detail=""
  for d in $devs; do
    bind "$d" || { detail="$detail $d bind: $R"; continue; }
    cmd "$d" map "$P" 0 65536 rw || detail="$detail $d map: $R"
    randfile 12345 "$work/a"
    put "$d" 7 "$work/a"
    cmd "$d" copy "$P" 7 40000 12345 || detail="$detail $d copy: $R"
    get "$d" 40000 12345 "$work/b"
    same "$work/a" "$work/b" || detail="$detail $d: wrong bytes"
    cleanup "$d" "$P"
  done
  verdict every-function "$D0" 0 "$ndev function(s): $types"
}

check_reload() { # rmmod with PASIDs still bound and mapped tears down cleanly; insmod again works
  ko=/lib/modules/vioasid_dma.ko
  detail="" kept=""
  for d in $devs; do
    for k in 1 2 3; do
      bind "$d" || { detail="$detail $d bind: $R"; break; }
      kept="$kept $d:$P"
      cmd "$d" map "$P" $((k * 4096)) 4096 rw || detail="$detail $d map: $R"
    done
  done
  rmmod vioasid_dma 2>"$work/err" || detail="$detail rmmod: $(cat "$work/err")"
  [ -e "$cls" ] && detail="$detail $cls still there after rmmod"
  insmod "$ko" 2>"$work/err" || detail="$detail insmod: $(cat "$work/err")"
  n=0
  for p in "$cls"/dma*; do [ -e "$p/cmd" ] && n=$((n + 1)); done
  [ "$n" = "$ndev" ] || detail="$detail $n functions after insmod, $ndev before"
  if [ "$ndev" -gt 0 ] && [ -z "$detail" ]; then
    bind "$D0" || detail="bind after reload: $R"
    cmd "$D0" map "$P" 0 8192 rw || detail="$detail map after reload: $R"
    cmd "$D0" copy "$P" 0 4096 4096 || detail="$detail copy after reload: $R"
    cleanup "$D0" "$P"
  fi
  verdict reload "$D0" 0 "rmmod with${kept:- no} bindings, insmod, $n function(s) back"
}

FAULT=
P=0
want devices && check_devices
if [ "$ndev" -gt 0 ]; then
  want syntax && check_syntax
  want bind-unbind && check_bind_unbind
  want copy && check_copy
  want fill && check_fill
  want compare && check_compare
  want isolation && check_isolation
  want ro-write-fault && check_ro_fault
  want unmapped-fault && check_unmapped_fault
  want unbind-fault && check_unbind_fault
  want remap && check_remap
  want shared-pasid && check_shared
  want many-pasids && check_many
  want batch && check_batch
  want every-function && check_every_function
fi
want reload && check_reload
echo "VIOASID-PASID-DONE passed=$passed failed=$failed skipped=$skipped"
rm -rf "$work"
[ "$failed" = 0 ]
