# Guest script of the vfio-nvme scenarios: the assigned NVMe does real DMA while virtio-mem
# plugs and unplugs.
set -e
dev=/dev/nvme0n1
i=0
while [ ! -b $dev ] && [ $i -lt 120 ]; do sleep 0.25; i=$((i + 1)); done
[ -b $dev ] || { echo "no $dev"; exit 1; }
pci=$(readlink -f /sys/class/nvme/nvme0/device)
obs nvme_pci "${pci##*/}"
obs iommu_groups "$(iommu_groups)"
if [ -e "$pci/iommu_group" ]; then
	group=$(readlink "$pci/iommu_group")
	obs nvme_iommu_group "${group##*/}"
fi
obs memtotal_kb "$(memtotal_kb)"
disk_check $dev 16
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
echo "read-back identical while resizing"
