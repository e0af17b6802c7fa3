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

# The live-migrate scenarios. migration_start: waits for /dev/vda, plugs 256M of vmem0, keeps
# a 128 MiB random pattern in tmpfs (in plugged memory too) and 16 MiB on the disk, then starts
# a loop that rewrites and reads back a counter in a 1 MiB file and in a 1 MiB block of the
# disk (32..48 MiB, O_DIRECT), counting wrong values, until migration_stop.
# migration_check WHEN: the same boot, memory size, pattern and disk contents as at the start.
migration_start() {
	i=0
	while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b /dev/vda ] || { echo "no /dev/vda after 30 s"; return 1; }
	mig_base=$(memtotal_kb)
	host resize vmem0 256M >/dev/null || return 1
	if ! wait_memtotal $((mig_base + 262144)) 90 2048; then
		echo "MemTotal $(memtotal_kb) kB after resizing to 256M, expected $((mig_base + 262144)) kB"
		return 1
	fi
	mig_plugged=$(memtotal_kb)
	mkdir -p /mnt/p
	mount -t tmpfs -o size=100% p /mnt/p
	dd if=/dev/urandom of=/mnt/p/pattern bs=1M count=128 2>/dev/null
	mig_mem_md5=$(md5sum </mnt/p/pattern | cut -d' ' -f1)
	dd if=/dev/urandom of=/tmp/disk bs=1M count=16 2>/dev/null
	dd if=/tmp/disk of=/dev/vda bs=1M oflag=direct 2>/dev/null || return 1
	mig_disk_md5=$(md5sum </tmp/disk | cut -d' ' -f1)
	rm -f /tmp/disk /tmp/stop /tmp/loop.result
	mig_boot_id=$(cat /proc/sys/kernel/random/boot_id)
	(
		set +e
		n=0
		bad=0
		disk_bad=0
		while [ ! -e /tmp/stop ]; do
			n=$((n + 1))
			printf '%1048576d' "$n" >/mnt/p/loop
			[ "$(tr -d ' ' </mnt/p/loop)" = "$n" ] || bad=$((bad + 1))
			block=$((32 + n % 16))
			if dd if=/mnt/p/loop of=/dev/vda bs=1M seek=$block count=1 oflag=direct 2>/dev/null; then
				back=$(dd if=/dev/vda bs=1M skip=$block count=1 iflag=direct 2>/dev/null | tr -d ' ')
				[ "$back" = "$n" ] || disk_bad=$((disk_bad + 1))
			else
				disk_bad=$((disk_bad + 1))
			fi
		done
		echo "$n $bad $disk_bad" >/tmp/loop.result
	) &
	mig_loop=$!
	sleep 1
	obs memtotal_kb "$mig_plugged"
}

migration_check() {
	kill -0 "$mig_loop" 2>/dev/null || { echo "$1: the loop ended"; return 1; }
	if [ "$(cat /proc/sys/kernel/random/boot_id)" != "$mig_boot_id" ]; then
		echo "$1: a new boot_id: the guest booted again"
		return 1
	fi
	[ "$(memtotal_kb)" = "$mig_plugged" ] || { echo "$1: MemTotal $(memtotal_kb) kB, $mig_plugged kB before"; return 1; }
	[ "$(md5sum </mnt/p/pattern | cut -d' ' -f1)" = "$mig_mem_md5" ] || { echo "$1: the memory pattern changed"; return 1; }
	echo 3 >/proc/sys/vm/drop_caches
	back=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
	[ "$back" = "$mig_disk_md5" ] || { echo "$1: the disk read back $back, $mig_disk_md5 was written"; return 1; }
}

# migration_stop: stops the loop; records loop_rounds, loop_errors (memory) and
# loop_disk_errors; fails if the loop read back a wrong value.
migration_stop() {
	touch /tmp/stop
	wait "$mig_loop"
	set -- $(cat /tmp/loop.result)
	obs loop_rounds "$1"
	obs loop_errors "$2"
	obs loop_disk_errors "$3"
	[ "$2" = 0 ] && [ "$3" = 0 ] || { echo "the loop read back a wrong value: $2 times in memory, $3 on the disk"; return 1; }
}

# migration_end: after the last migration, the devices work on: a new disk write and read,
# and a plug to 512M.
migration_end() {
	disk_check /dev/vda 8 || { echo "the disk check failed after the migration"; return 1; }
	host resize vmem0 512M >/dev/null || return 1
	if ! wait_memtotal $((mig_base + 524288)) 90 2048; then
		echo "MemTotal $(memtotal_kb) kB after resizing to 512M after the migration, expected $((mig_base + 524288)) kB"
		return 1
	fi
}
