#!/bin/sh
# vioasid guest disk tests (busybox): usage disk_tests.sh DISK TESTS GEN
# TESTS is "all" or a comma list of names from /guest_tests/tests.conf ("name offset length bs
# mode" lines written by the image builder from guest_tests/patterns.py). Each test writes the
# canonical pattern bytes [offset, offset+length) for generation GEN, reads them back and
# compares md5 sums; prints VIOASID-TEST lines and a final VIOASID-TESTS-DONE line.
# "stopcheck" as TESTS exits 0 if the disk's last sector holds the stop magic.
disk=$1 tests=$2 gen=${3:-0}
conf=/guest_tests/tests.conf
work=/tmp/vioasid-tests
mkdir -p "$work"

if [ "$tests" = stopcheck ]; then
  size=$(blockdev --getsize64 "$disk")
  dd if="$disk" bs=512 iflag=direct,skip_bytes skip=$((size - 512)) count=1 2>/dev/null \
    | head -c 12 | grep -q '^VIOASID-STOP$'
  exit $?
fi

# pattern OFFSET LENGTH FILE: the canonical pattern bytes (see guest_tests/patterns.py)
pattern() {
  first=$(($1 / 512)) last=$((($1 + $2 - 1) / 512))
  awk -v a="$first" -v b="$last" -v g="$gen" 'BEGIN {
    for (lba = a; lba <= b; lba++) {
      head = "VIOASID g=" g " lba=" lba " "
      unit = sprintf("%08x", (lba * 2654435761 + g * 7919) % 2147483648)
      u = unit unit unit unit unit unit unit unit
      s = head u u u u u u u u
      printf "%s\n", substr(s, 1, 511)
    }
  }' > "$work/full"
  dd if="$work/full" of="$3" bs=65536 iflag=skip_bytes,count_bytes \
    skip=$(($1 - first * 512)) count="$2" 2>/dev/null
}

sum() { md5sum "$1" | cut -d' ' -f1; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# write_part FILE OFF LEN BS (direct; file offset 0 maps to disk offset OFF)
write_direct() {
  dd if="$1" of="$disk" bs="$4" iflag=skip_bytes oflag=direct,seek_bytes skip=$(($2 - base)) \
    seek="$2" count=$(($3 / $4)) conv=notrunc 2>"$work/err"
}

run_test() { # name offset length bs mode
  name=$1 off=$2 len=$3 bs=$4 mode=$5
  pattern "$off" "$len" "$work/want" || { result fail "pattern generation failed"; return; }
  base=$off
  case "$mode" in
    direct)
      write_direct "$work/want" "$off" "$len" "$bs" || { result fail "write: $(tail -1 "$work/err")"; return; }
      dd if="$disk" of="$work/got" bs="$bs" iflag=direct,skip_bytes skip="$off" \
        count=$((len / bs)) 2>"$work/err" || { result fail "read: $(tail -1 "$work/err")"; return; }
      ;;
    buffered)
      dd if="$work/want" of="$disk" bs="$bs" oflag=seek_bytes seek="$off" conv=notrunc,fsync \
        2>"$work/err" || { result fail "write: $(tail -1 "$work/err")"; return; }
      drop_caches
      dd if="$disk" of="$work/got" bs="$bs" iflag=skip_bytes,count_bytes skip="$off" \
        count="$len" 2>"$work/err" || { result fail "read: $(tail -1 "$work/err")"; return; }
      ;;
    parallel)
      q=$((len / 4))
      pids=""
      for k in 0 1 2 3; do
        write_direct "$work/want" $((off + k * q)) "$q" "$bs" &
        pids="$pids $!"
      done
      okw=1
      for p in $pids; do wait "$p" || okw=0; done
      [ $okw = 1 ] || { result fail "a parallel writer failed"; return; }
      dd if="$disk" of="$work/got" bs="$bs" iflag=direct,skip_bytes skip="$off" \
        count=$((len / bs)) 2>"$work/err" || { result fail "read: $(tail -1 "$work/err")"; return; }
      ;;
    *) result fail "unknown mode $mode"; return ;;
  esac
  want=$(sum "$work/want") got=$(sum "$work/got")
  gsize=$(wc -c < "$work/got")
  if [ "$want" = "$got" ]; then
    result pass "md5=$want bytes=$gsize"
  else
    result fail "md5 want=$want got=$got bytes=$gsize"
  fi
}

passed=0 failed=0
result() {
  if [ "$1" = pass ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  echo "VIOASID-TEST name=$name gen=$gen result=$1 detail=$2"
}

while read -r name off len bs mode; do
  [ -n "$name" ] || continue
  case ",$tests," in
    *",all,"* | *",$name,"*) run_test "$name" "$off" "$len" "$bs" "$mode" ;;
  esac
done < "$conf"
echo "VIOASID-TESTS-DONE gen=$gen passed=$passed failed=$failed"
rm -rf "$work"
[ "$failed" = 0 ]
