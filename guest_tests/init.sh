#!/bin/sh
# vioasid test guest /init (busybox): mount the basics, load the modules listed in
# /etc/vioasid/modules, then run the disk tests named by vioasid.tests= on /dev/vda and power off.
# Kernel command line: vioasid.tests=a,b|all|none  vioasid.loop=1 (repeat until the stop sector)
#   vioasid.loops=N (at most N passes)  vioasid.disk=/dev/vdX  vioasid.shell=1 (shell, no tests)
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "VIOASID-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

while read -r mod; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod.ko" || echo "VIOASID-ERROR detail=insmod $mod failed"
done < /etc/vioasid/modules

tests=all loop=0 loops=0 disk=/dev/vda shell=0
for word in $(cat /proc/cmdline); do
  case "$word" in
    vioasid.tests=*) tests="${word#vioasid.tests=}" ;;
    vioasid.loop=*) loop="${word#vioasid.loop=}" ;;
    vioasid.loops=*) loops="${word#vioasid.loops=}" ;;
    vioasid.disk=*) disk="${word#vioasid.disk=}" ;;
    vioasid.shell=*) shell="${word#vioasid.shell=}" ;;
  esac
done

if [ "$shell" = 1 ]; then
  echo "vioasid guest shell (poweroff -f to quit)"
  setsid cttyhack sh -l
  poweroff -f
fi

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
