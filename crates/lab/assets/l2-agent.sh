#!/bin/busybox sh
# The guest agent (L2's init): load the virtio modules, run the guest script with the
# helpers of /lab/lib.sh, report its output (`@@out`) and exit status (`@@exit`), power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /lab/modules.list); do
	insmod "/lab/modules/$m.ko" || echo "@@agent insmod $m failed"
done
stty -echo 2>/dev/null
echo "@@agent ready $(cut -d' ' -f1 /proc/uptime)"
{
	(
		. /lab/lib.sh
		. /lab/guest.sh
	)
	echo $? >/tmp/rc
} 2>&1 | while IFS= read -r l; do echo "@@out $l"; done
echo "@@exit $(cat /tmp/rc)"
sync
poweroff -f
