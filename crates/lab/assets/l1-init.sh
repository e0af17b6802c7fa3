#!/bin/busybox sh
# L1's init: mount, load the kvm (and vfio) modules, then serve the host's control loop on
# the virtio port `lab.ctl`: each line from the host is a shell command; its output comes
# back followed by `@@rc <status>`.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
ip link set lo up
# Huge pages for shared memory on request (MADV_HUGEPAGE), as for anonymous memory: memvisor's
# memfd guest RAM asks for them, QEMU's anonymous guest RAM gets them by default.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
for m in $(cat /lab/modules.list); do
	insmod "/lab/modules/$m.ko" || echo "@@l1 insmod $m failed"
done

# The device of the virtio port named $1.
port() {
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return 0; }
	done
	return 1
}
i=0
while ! port lab.ctl >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
CTL=$(port lab.ctl)
L2CON=$(port lab.l2con)
RELAY=$(port lab.relay)
echo "@@l1 ports ctl=$CTL l2con=$L2CON relay=$RELAY"

# relay CONTROL: connects stdin/stdout to the VMM's control socket: QEMU's QMP on a TCP port
# on loopback (`tcp:PORT`, busybox nc), or `unix:PATH`, memvisor's API socket, through
# memvisor's own relay (busybox nc cannot reach a Unix socket; it waits for the socket to
# appear).
relay() {
	case "$1" in
	unix:*) /lab/memvisor/memvisor api --socket "${1#unix:}" pipe 2>>/tmp/relay.log ;;
	tcp:*) nc 127.0.0.1 "${1#tcp:}" 2>/dev/null ;;
	esac
}

# start_relay CONTROL: relays CONTROL to `lab.relay` in the background, trying again until
# it connects (for up to a minute).
start_relay() {
	(
		i=0
		while [ $i -lt 600 ]; do
			relay "$1" <>"$RELAY" >&0 && break
			sleep 0.1
			i=$((i + 1))
		done
	) </dev/null >/dev/null 2>&1 &
}

# cur: the name of the VMM the host controls: `vmm`, or `vmm2` once a migration's
# destination took over (adopt_vmm); migrations go back and forth between the two names.
# Its pid is in /run/NAME.pid, its exit status in /run/NAME.rc once it has exited, its
# stderr in /tmp/NAME.log. other: the name a migration's destination gets.
cur() { cat /run/vmm.current 2>/dev/null || echo vmm; }
other() { if [ "$(cur)" = vmm ]; then echo vmm2; else echo vmm; fi; }

# start_vmm [--control unix:PATH|tcp:PORT] [--second] CMD...: starts an L2 VMM and prints
# its pid; a watcher waits for it and writes its exit status. The first VMM (`vmm`) has its
# serial console on `lab.l2con` and its control socket (TCP 4444 unless --control names
# another) relayed to `lab.relay`. A --second one (a migration's destination, named
# `other`) runs beside the current one: a virtio port opens only once, so its console is a
# pair of FIFOs until adopt_vmm connects them to `lab.l2con`, and its control socket is not
# relayed until then.
start_vmm() {
	control=tcp:4444
	second=
	while :; do
		case "$1" in
		--control) control=$2; shift 2 ;;
		--second) second=1; shift ;;
		*) break ;;
		esac
	done
	if [ -n "$second" ]; then name=$(other); else name=vmm; fi
	rm -f /run/$name.pid /run/$name.rc /run/$name.rc.tmp /run/$name.killed
	[ -z "$second" ] || { rm -f /run/$name.in /run/$name.out; mkfifo /run/$name.in /run/$name.out; }
	(
		# `exec` in a subshell: $! is the VMM's own pid.
		if [ -z "$second" ]; then
			(exec "$@" <>"$L2CON" >&0 2>/tmp/$name.log) &
		else
			(exec "$@" <>/run/$name.in 1<>/run/$name.out 2>/tmp/$name.log) &
		fi
		echo $! >/run/$name.pid
		wait $!
		echo $? >/run/$name.rc.tmp
		mv /run/$name.rc.tmp /run/$name.rc
	) </dev/null >/dev/null 2>&1 &
	i=0
	while [ ! -s /run/$name.pid ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
	if [ -z "$second" ]; then
		echo vmm >/run/vmm.current
		start_relay "$control"
	fi
	echo "pid $(cat /run/$name.pid)"
}

# adopt_vmm CONTROL: once the current VMM has exited, the second becomes the one the host
# controls: its console FIFOs are joined to `lab.l2con` (an earlier join is ended first),
# its control socket CONTROL is relayed to `lab.relay`.
adopt_vmm() {
	[ -e /run/$(cur).rc ] || { echo "the current VMM still runs"; return 1; }
	next=$(other)
	# The earlier join holds the console port open until its subshell has exited too (the
	# port takes one opener: opening it before then fails with EBUSY), so wait for all three.
	if [ -s /run/bridge.pids ]; then
		old=$(cat /run/bridge.pids)
		kill $old 2>/dev/null
		i=0
		while [ $i -lt 100 ]; do
			alive=
			# A zombie (exited, not yet reaped by this shell) holds nothing open.
			for p in $old; do grep -qs ') [^Z] ' /proc/$p/stat && alive=1; done
			[ -z "$alive" ] && break
			sleep 0.05
			i=$((i + 1))
		done
	fi
	rm -f /run/bridge.pids
	(
		exec 3<>"$L2CON"
		cat /run/$next.out >&3 &
		out=$!
		cat <&3 >/run/$next.in &
		in=$!
		read -r me _ </proc/self/stat
		echo "$out $in $me" >/run/bridge.pids
		wait
	) </dev/null >/dev/null 2>>/tmp/bridge.log &
	i=0
	while [ ! -s /run/bridge.pids ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
	echo $next >/run/vmm.current
	start_relay "$1"
	echo "adopted $(cat /run/$next.pid)"
}

# kill_when_grown KB: in the background, kills the second VMM (SIGKILL) once its VmRSS grew by
# KB kB over what it is now: a migration's destination, mid-stream. What it saw goes to
# /run/NAME.killed.
kill_when_grown() {
	pid=$(cat /run/$(other).pid)
	start=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
	[ -n "$start" ] || { echo "the second VMM does not run"; return 1; }
	killed=/run/$(other).killed
	rm -f "$killed"
	(
		while kill -0 "$pid" 2>/dev/null; do
			now=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
			if [ -n "$now" ] && [ "$now" -ge $((start + $1)) ]; then
				kill -9 "$pid"
				echo "killed at VmRSS $now kB ($start kB when armed)" >"$killed"
				break
			fi
			sleep 0.05
		done
	) </dev/null >/dev/null 2>&1 &
	echo "armed at VmRSS $start kB"
}

# start_proxy LISTEN TARGET FAULT: relays one migration stream from the Unix socket LISTEN to
# TARGET in the background, breaking it as FAULT says (`memvisor lab proxy`); returns once
# LISTEN exists.
start_proxy() {
	rm -f "$1" /tmp/proxy.log
	(/lab/memvisor/memvisor lab proxy "$1" "$2" --fault "$3" </dev/null >/tmp/proxy.log 2>&1 &)
	i=0
	while [ ! -S "$1" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
	[ -S "$1" ] || { cat /tmp/proxy.log; return 1; }
}

# second_vmm_exit: once the second VMM has exited, its exit status (`rc N`), the end of its
# log, and what a fault's killer or proxy saw; fails while it runs.
second_vmm_exit() {
	n=$(other)
	[ -e /run/$n.rc ] || return 1
	echo "rc $(cat /run/$n.rc)"
	tail -n 2 /tmp/$n.log
	cat /run/$n.killed /tmp/proxy.log 2>/dev/null
	return 0
}

# vmm_status: the VMM's memory counters (kB) from /proc/<pid>/status.
vmm_status() {
	grep -E '^(VmRSS|VmHWM|VmLck|VmPin):' "/proc/$(cat /run/$(cur).pid)/status"
}

# vmm_log: the VMM's stderr (and the relay's, if it said anything) and whether it still runs;
# if it does, each of its threads: name, state, user and system time (ticks), wait channel.
vmm_log() {
	tail -n 20 /tmp/$(cur).log
	[ -s /tmp/relay.log ] && sed 's/^/relay: /' /tmp/relay.log | tail -n 5
	[ -s /tmp/bridge.log ] && sed 's/^/console bridge: /' /tmp/bridge.log | tail -n 5
	pid=$(cat /run/$(cur).pid)
	if kill -0 "$pid" 2>/dev/null; then
		echo "(running)"
		for t in /proc/"$pid"/task/*; do
			set -- $(sed 's/.*) //' "$t/stat")
			echo "thread ${t##*/} $(cat "$t/comm"): state $1 utime ${12} stime ${13} wchan $(cat "$t/wchan" 2>/dev/null)"
		done
		kvm_exits 1
	else
		echo "(exited)"
	fi
}

# kvm_exits SECONDS: what L2's vCPUs exit for during SECONDS (KVM's tracepoints in L1): the
# most frequent exit reasons with the guest's rIP, port and MMIO accesses, counted.
kvm_exits() {
	T=/sys/kernel/tracing
	[ -e $T/trace ] || mount -t tracefs nodev $T 2>/dev/null || { echo "kvm exits: no tracefs"; return 0; }
	events="kvm_exit kvm_pio kvm_mmio kvm_userspace_exit"
	echo >$T/trace
	for e in $events; do echo 1 >$T/events/kvm/$e/enable 2>/dev/null; done
	sleep "$1"
	for e in $events; do echo 0 >$T/events/kvm/$e/enable 2>/dev/null; done
	echo "kvm exits in $1 s (count, event):"
	sed -n 's/.* \(kvm_[a-z_]*\): \(.*\)/\1 \2/p' $T/trace |
		sed 's/vcpu [0-9]* //; s/ info1 .*//; s/ info .*//' | sort | uniq -c | sort -rn | head -n 15
}

# bind_vfio: binds every NVMe controller to vfio-pci; prints `bdf <addr> group <n>`.
bind_vfio() {
	found=1
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/class")" = 0x010802 ] || continue
		bdf=${d##*/}
		[ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
		echo vfio-pci >"$d/driver_override"
		echo "$bdf" >/sys/bus/pci/drivers_probe
		group=$(readlink "$d/iommu_group")
		[ -e "/dev/vfio/${group##*/}" ] || { echo "no /dev/vfio/${group##*/}"; return 1; }
		echo "bdf $bdf group ${group##*/}"
		found=0
	done
	return $found
}

exec 0<>"$CTL" 1>&0 2>&0
echo "@@ready $(cut -d' ' -f1 /proc/uptime)"
while IFS= read -r line; do
	(eval "$line")
	echo "@@rc $?"
done
poweroff -f
