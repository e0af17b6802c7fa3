# Helpers for guest scripts (sourced by the agent before the script).

# host STEP ARGS...: asks the host for a step (e.g. `host resize vmem0 1G`), waits for the
# answer on the console and prints it; fails if the host refused or failed.
host() {
	echo "@@host $*" >/dev/console
	IFS= read -r reply
	reply=$(echo "$reply" | tr -d '\r')
	case "$reply" in
	"@@ok"*) echo "${reply#@@ok}" ;;
	*) echo "host step '$*' failed: ${reply#@@err }" >&2; return 1 ;;
	esac
}

# obs KEY VALUE...: records an observation in the report.
obs() {
	k=$1
	shift
	echo "@@obs $k $*" >/dev/console
}

memtotal_kb() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
memfree_kb() { awk '/^MemFree:/ { print $2 }' /proc/meminfo; }

# online_blocks: how many memory blocks are online.
online_blocks() {
	n=0
	for f in /sys/devices/system/memory/memory*/online; do
		[ "$(cat "$f")" = 1 ] && n=$((n + 1))
	done
	echo $n
}

# iommu_groups: how many IOMMU groups exist.
iommu_groups() { ls /sys/kernel/iommu_groups 2>/dev/null | wc -l; }

# wait_memtotal KB SECONDS [TOLERANCE_KB]: waits until MemTotal is KB (within tolerance),
# looking every 0.1 s.
wait_memtotal() {
	i=0
	while [ $i -lt $(($2 * 10)) ]; do
		d=$(($(memtotal_kb) - $1))
		[ $d -lt 0 ] && d=$((-d))
		[ $d -le "${3:-0}" ] && return 0
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}

# uptime_s: seconds since this boot (/proc/uptime, hundredths).
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# seconds_since T0: seconds from T0 (an uptime_s) to now, with two decimals.
seconds_since() { awk -v t0="$1" '{ printf "%.2f\n", $1 - t0 }' /proc/uptime; }

# fill_memory [RESERVE_MB]: writes all free memory but RESERVE_MB (default 64) once, so the
# host backs it, then frees it again.
fill_memory() {
	mkdir -p /mnt/fill
	mount -t tmpfs -o size=100% fill /mnt/fill
	dd if=/dev/zero of=/mnt/fill/f bs=1M count=$(($(memfree_kb) / 1024 - ${1:-64})) 2>/dev/null
	rm -f /mnt/fill/f
	umount /mnt/fill
}

# disk_check DEVICE MB: writes MB of random data with O_DIRECT, reads it back, compares.
disk_check() {
	dd if=/dev/urandom of=/tmp/pattern bs=1M count="$2" 2>/dev/null
	dd if=/tmp/pattern of="$1" bs=1M oflag=direct 2>/dev/null || return 1
	dd if="$1" of=/tmp/back bs=1M count="$2" iflag=direct 2>/dev/null || return 1
	a=$(md5sum </tmp/pattern | cut -d' ' -f1)
	b=$(md5sum </tmp/back | cut -d' ' -f1)
	obs written_md5 "$a"
	obs read_md5 "$b"
	rm -f /tmp/pattern /tmp/back
	[ "$a" = "$b" ]
}
