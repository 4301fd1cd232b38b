#!/bin/sh
# vioasid test guest /init (busybox): mount the basics, load the modules listed in
# /etc/vioasid/modules (the last is the PASID DMA driver, /lib/modules/vioasid_dma.ko), then run
# the tests named by vioasid.tests= and power off: the disk tests on /dev/vda, and the PASID DMA
# checks (images/guest/pasid_tests.sh; /guest_tests/ in the guest) when the list holds "pasid",
# the guest-measured PASID DMA figures (images/guest/pasid_bench.sh, vioasid.bench_s=N seconds
# each) when it holds "pasid-bench".
# Kernel command line: vioasid.tests=a,b|all|none|pasid[,...]  vioasid.loop=1 (repeat until the
#   stop sector)  vioasid.loops=N (at most N passes)  vioasid.disk=/dev/vdX
#   vioasid.pasid=check,check (the PASID checks to run; default all)  vioasid.shell=1 (shell)
#   vioasid.tests=pasid-loop: guest_tests/pasid_loop.sh (PASID DMA jobs until the stop sector;
#   vioasid.pasid_extra=N more PASIDs bound)
#   vioasid.tests=seed with vioasid.seed=part,part vioasid.seed_s=N: guest_tests/seed_tests.sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "VIOASID-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

loaded=""
while read -r mod; do
  [ -n "$mod" ] || continue
  if insmod "/lib/modules/$mod.ko"; then
    loaded="$loaded${loaded:+,}$mod"
  else
    echo "VIOASID-ERROR detail=insmod $mod failed"
  fi
done < /etc/vioasid/modules
echo "VIOASID-MODULES loaded=${loaded:-none}"

tests=all loop=0 loops=0 disk=/dev/vda shell=0 pasid=all bench_s=3 seed=types seed_s=20
pasid_extra=0
for word in $(cat /proc/cmdline); do
  case "$word" in
    vioasid.tests=*) tests="${word#vioasid.tests=}" ;;
    vioasid.loop=*) loop="${word#vioasid.loop=}" ;;
    vioasid.loops=*) loops="${word#vioasid.loops=}" ;;
    vioasid.disk=*) disk="${word#vioasid.disk=}" ;;
    vioasid.shell=*) shell="${word#vioasid.shell=}" ;;
    vioasid.pasid=*) pasid="${word#vioasid.pasid=}" ;;
    vioasid.pasid_extra=*) pasid_extra="${word#vioasid.pasid_extra=}" ;;
    vioasid.bench_s=*) bench_s="${word#vioasid.bench_s=}" ;;
    vioasid.seed=*) seed="${word#vioasid.seed=}" ;;
    vioasid.seed_s=*) seed_s="${word#vioasid.seed_s=}" ;;
  esac
done

if [ "$shell" = 1 ]; then
  echo "vioasid guest shell (poweroff -f to quit)"
  setsid cttyhack sh -l
  poweroff -f
fi

case ",$tests," in
  *,pasid,*) sh /guest_tests/pasid_tests.sh "$pasid" ;;
esac
case ",$tests," in
  *,pasid-bench,*) sh /guest_tests/pasid_bench.sh "$bench_s" ;;
esac
case ",$tests," in
  *,pasid-loop,*) sh /guest_tests/pasid_loop.sh "$disk" "$loops" "$pasid_extra" ;;
esac
case ",$tests," in
  *,seed,*) sh /guest_tests/seed_tests.sh "$seed" "$seed_s" ;;
esac
tests=$(echo ",$tests," | sed 's/,pasid-bench,/,/g; s/,pasid-loop,/,/g; s/,pasid,/,/g; s/,seed,/,/g; s/^,//; s/,$//')
[ -n "$tests" ] || tests=none

if [ "$tests" != none ]; then
  i=0
  while [ ! -b "$disk" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if [ ! -b "$disk" ]; then
    echo "VIOASID-ERROR detail=no block device $disk"
  else
    gen=0
    while :; do
      sh /guest_tests/disk_tests.sh "$disk" "$tests" "$gen"
      [ "$loop" = 1 ] || break
      gen=$((gen + 1))
      [ "$loops" -gt 0 ] && [ "$gen" -ge "$loops" ] && break
      if sh /guest_tests/disk_tests.sh "$disk" stopcheck "$gen"; then
        echo "VIOASID-LOOP-STOPPED gen=$gen"
        break
      fi
    done
  fi
fi
sync
poweroff -f
