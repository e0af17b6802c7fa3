# Guest script of the vfio-nvme and blk-zero-copy scenarios: the disk under test (the
# assigned NVMe if there is one, else the first virtio-blk disk) does real DMA while virtio-mem
# plugs and unplugs. Before the resizes it times a 128 MiB sequential write and read
# (`disk_write_s`, `disk_read_s`: the figures `lab bench` compares). An assigned NVMe must
# then block a migration (`migrate refused`; its scenarios declare the `migrate` step).
set -e
dev=
i=0
while [ -z "$dev" ] && [ $i -lt 120 ]; do
	for d in /dev/nvme0n1 /dev/vda; do
		if [ -b $d ]; then dev=$d; break; fi
	done
	[ -n "$dev" ] || sleep 0.25
	i=$((i + 1))
done
[ -n "$dev" ] || { echo "no disk (/dev/nvme0n1 or /dev/vda)"; exit 1; }
obs disk "$dev"
# The disk's PCI function: the first directory above its device that has a config space
# (an NVMe namespace's block device is a virtual multipath node: start from the controller).
case $dev in
/dev/nvme*) pci=$(readlink -f /sys/class/nvme/nvme0/device) ;;
*) pci=$(readlink -f "/sys/block/${dev#/dev/}/device") ;;
esac
while [ ! -e "$pci/config" ] && [ "$pci" != /sys ]; do pci=${pci%/*}; done
obs disk_pci "${pci##*/}"
obs iommu_groups "$(iommu_groups)"
if [ -e "$pci/iommu_group" ]; then
	group=$(readlink "$pci/iommu_group")
	obs disk_iommu_group "${group##*/}"
	# DMA (strict), DMA-FQ (lazy) or identity (bypass).
	obs disk_iommu_domain "$(cat "$pci/iommu_group/type" 2>/dev/null)"
fi
obs memtotal_kb "$(memtotal_kb)"
# 64 MiB written and read back identical before anything else.
disk_check $dev 64

# Sequential throughput before any resize, timed in the guest with /proc/uptime (hundredths,
# read by the shell itself around dd): 128 MiB written (`disk_write_s`), then read
# (`disk_read_s`), the disk's first 32 MiB four times over, with O_DIRECT in 1 MiB requests.
# Seconds for the 128 MiB: 32 MiB once took 0.06-0.18 s on the assigned NVMe, a few ticks of
# that clock.
timed_dd() {
	key=$1
	shift
	read -r t0 _ </proc/uptime
	for _pass in 1 2 3 4; do
		dd "$@" bs=1M count=32 2>/dev/null
	done
	read -r t1 _ </proc/uptime
	obs "$key" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }')"
}
timed_dd disk_write_s if=/dev/zero of="$dev" oflag=direct
timed_dd disk_read_s if="$dev" of=/dev/null iflag=direct
host stats >/dev/null

# Keep the disk busy while resizing: write and verify patterns in a loop until told to stop.
(
	n=0
	while [ ! -e /tmp/stop ]; do
		disk_check $dev 8 || { echo "mismatch in pass $n"; exit 1; }
		n=$((n + 1))
	done
	echo "$n busy passes"
) &
busy=$!
host resize vmem0 1G >/dev/null
obs memtotal_kb "$(memtotal_kb)"
host resize vmem0 0 >/dev/null
obs memtotal_kb "$(memtotal_kb)"
host resize vmem0 512M >/dev/null
obs memtotal_kb "$(memtotal_kb)"
touch /tmp/stop
wait $busy
# An assigned device whose driver cannot migrate it blocks a migration before anything is
# sent, and says so (the step `migrate refused`: no destination; the guest runs on).
case $dev in
/dev/nvme*)
	why=$(host migrate refused)
	case "$why" in
	*VFIO*) obs migration_blocked 1 ;;
	*) echo "the migration was refused, but not for the assigned device: $why"; exit 1 ;;
	esac
	;;
esac
echo "read-back identical while resizing"
