#!/usr/bin/env bash
# Schemathesis against a live VMM (README: The management API).
#
# Starts `target/release/memvisor run` with the idle guest (crates/vmm/tests/data/idle-pvh.elf:
# it writes a line on COM1 at each boot and halts), a virtio-mem device, a virtio-iommu and a
# disk, then runs .ci/api_fuzz.py (schemathesis's pytest plugin, straight over the Unix API
# socket) against docs/api/openapi.json, checks that the VMM still runs and answers, stops it
# through the API and checks that it exited 0. Then a second VMM is powered off through
# `memvisor api power-off --timeout 1` (the idle guest ignores the button): it must exit 0
# after the timeout.
#
# Needs python3 with venv and PyPI (the venv is kept in target/api-fuzz/venv), and /dev/kvm.
# MEMVISOR_FUZZ_EXAMPLES (default 300) bounds the examples per operation and phase;
# MEMVISOR_FUZZ_SKIP_CHECKS leaves named checks out; MEMVISOR_BINARY runs that memvisor instead
# of building target/release/memvisor. Exit status: 0 all passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

work=target/api-fuzz
venv=$work/venv
requirements=.ci/api-fuzz-requirements.txt
memvisor=${MEMVISOR_BINARY:-target/release/memvisor}
kernel=crates/vmm/tests/data/idle-pvh.elf

echo "== the schemathesis venv ($venv)"
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
"$venv/bin/python" -c 'import schemathesis; print("schemathesis", schemathesis.__version__)'

if [ -z "${MEMVISOR_BINARY:-}" ]; then
    echo "== cargo build --release -p memvisor"
    cargo build --release --locked -p memvisor
fi

# A short folder for the sockets (a socket path has at most 107 bytes).
run=$(mktemp -d /tmp/memvisor-api-fuzz.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$run"
}
trap cleanup EXIT

# start NAME [ARGS...]: starts a VMM with the idle guest and the API on $run/NAME.sock, waits
# until its guest runs; its pid in $vmm.
start() {
    local name=$1
    shift
    truncate -s 1M "$run/$name.img"
    "$memvisor" run --kernel "$kernel" --memory 64M --vmem id=vmem0,size=256M,block=2M \
        --viommu --disk "id=disk0,path=$run/$name.img" --serial "file:$run/$name.serial" \
        --api-socket "$run/$name.sock" "$@" >"$run/$name.log" 2>&1 &
    vmm=$!
    pids+=("$vmm")
    for _ in $(seq 100); do
        # The API answers before the first boot has started its vCPUs (state "stopped").
        if "$memvisor" api --socket "$run/$name.sock" vm 2>/dev/null | grep -q '^running'; then
            return 0
        fi
        if ! kill -0 "$vmm" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "the VMM $name did not come up:"
    cat "$run/$name.log"
    exit 1
}

# ended PID SECONDS: waits up to SECONDS for PID to end; its exit status in $status
# (255 if it had not ended).
ended() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        status=255
    else
        status=0
        wait "$pid" || status=$?
    fi
}

failed=0
fail() {
    echo "FAILED: $*"
    failed=1
}

echo "== schemathesis against a live VMM (.ci/api_fuzz.py)"
start fuzz
fuzz_pid=$vmm
export MEMVISOR_API_SOCKET=$run/fuzz.sock
export MEMVISOR_FUZZ_EXAMPLES=${MEMVISOR_FUZZ_EXAMPLES:-300}
export HYPOTHESIS_STORAGE_DIRECTORY=$work/hypothesis
export PYTHONDONTWRITEBYTECODE=1
if ! timeout 600 "$venv/bin/python" -m pytest -p no:cacheprovider --rootdir .ci -v -rf .ci/api_fuzz.py; then
    fail "schemathesis (above)"
fi

echo "== the VMM is still there and answers"
if kill -0 "$fuzz_pid" 2>/dev/null && "$memvisor" api --socket "$run/fuzz.sock" vm; then
    boots=$(grep -c "memvisor idle guest" "$run/fuzz.serial" || true)
    echo "the guest booted $boots times (its COM1 line each time)"
    [ "$boots" -ge 1 ] || fail "the idle guest never wrote its line: did it run?"
    echo "== shutdown through the API: exit 0"
    "$memvisor" api --socket "$run/fuzz.sock" shutdown
    ended "$fuzz_pid" 10
    [ "$status" -eq 0 ] || fail "after the API's shutdown the VMM ended with $status (255: still running)"
    [ ! -e "$run/fuzz.sock" ] || fail "the VMM left its socket behind"
else
    fail "the VMM died or stopped answering during the run"
    ended "$fuzz_pid" 1
    echo "its exit status: $status; its log:"
    tail -n 40 "$run/fuzz.log"
fi

echo "== power-off: the idle guest ignores the button, the VMM stops it after the timeout, exit 0"
start poweroff
poweroff_pid=$vmm
"$memvisor" api --socket "$run/poweroff.sock" power-off --timeout 1
ended "$poweroff_pid" 10
[ "$status" -eq 0 ] || fail "power-off with a 1 s timeout: the VMM ended with $status (255: still running after 10 s)"

if [ "$failed" -ne 0 ]; then
    echo "api-fuzz: FAILED"
    exit 1
fi
echo "api-fuzz: all passed"
