//! Saving and restoring a running guest's KVM state on real KVM: a probe
//! guest paused mid-run, saved from its parked vCPU thread, resumes on a
//! fresh VM exactly where it stopped; parked vCPU threads run
//! [`VcpuControl::with_parked`] jobs once each, with no port access half
//! done.
//!
//! These tests need `/dev/kvm` and fail without it: they never pass
//! without having run a guest.
#![cfg(target_arch = "x86_64")]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use memvisor_machine::{Machine, MachineConfig, RamSpec};
use memvisor_test_support::MIB;
use memvisor_vmm::exit::ExitSignal;
use memvisor_vmm::probe::{ProbeGuest, REPORT_PORT};
use memvisor_vmm::vcpu::{PauseError, VcpuControl, VcpuIo, VcpuThreads};
use memvisor_vmm::vm::{PortWrite, RunReport, Vcpu, Vm, VmError};
use memvisor_vmm::x86::state::{self, PlatformState, StateError, VcpuState};

const PROBE_AT: u64 = 0x1_0000;
const X: u64 = 0x30_0000;
const Y: u64 = 0x30_0008;
const VX: u64 = 0x1111_2222_3333_4444;
const VY: u64 = 0xaaaa_bbbb_cccc_dddd;
const WAIT: Duration = Duration::from_secs(10);

fn machine() -> Machine {
    Machine::new(&MachineConfig {
        ram: vec![RamSpec { addr: 0, size: 4 * MIB }],
        ..Default::default()
    })
    .unwrap()
}

/// A VM with the in-kernel platform (irqchip, PIT), as the VMM builds it.
fn new_vm(machine: &Machine) -> Vm {
    let vm = Vm::new(machine).unwrap_or_else(|e| panic!("this test needs a usable /dev/kvm: {e}"));
    vm.create_platform().unwrap();
    vm
}

/// Waits up to [`WAIT`] for `done`.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Port I/O of the test guests: writes are recorded; a read of port
/// `0xe0 + n` returns how many reads that port has had. At write number
/// `hold_at_write` or read number `hold_at_read` of port 0xe0, the vCPU
/// waits in the access until a pause is asked for, so the pause lands
/// with that `out` or `in` not yet completed by KVM.
#[derive(Default)]
struct Io {
    writes: Mutex<Vec<PortWrite>>,
    hold_at_write: Option<usize>,
    hold_at_read: Option<u32>,
    control: OnceLock<Arc<VcpuControl>>,
    reads: [AtomicU32; 4],
}

impl Io {
    fn hold(&self) {
        wait_for("the pause", || self.control.get().is_some_and(|c| c.is_paused()));
    }

    fn writes(&self) -> Vec<PortWrite> {
        self.writes.lock().unwrap().clone()
    }

    fn reads(&self, port: u16) -> u32 {
        self.reads[usize::from(port - REPORT_PORT)].load(Ordering::SeqCst)
    }
}

impl VcpuIo for Io {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let n = self.reads[usize::from(port - REPORT_PORT)].fetch_add(1, Ordering::SeqCst) + 1;
        data.copy_from_slice(&n.to_le_bytes()[..data.len()]);
        if port == REPORT_PORT && Some(n) == self.hold_at_read {
            self.hold();
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        let count = {
            let mut writes = self.writes.lock().unwrap();
            writes.push(PortWrite {
                port,
                data: data.to_vec(),
            });
            writes.len()
        };
        if Some(count) == self.hold_at_write {
            self.hold();
        }
    }

    fn mmio_read(&self, addr: u64, _: &mut [u8]) {
        panic!("unexpected MMIO read at {addr:#x}");
    }

    fn mmio_write(&self, addr: u64, _: &[u8]) {
        panic!("unexpected MMIO write at {addr:#x}");
    }
}

fn start(vcpus: Vec<Vcpu>, io: &Arc<Io>) -> (VcpuThreads, Arc<ExitSignal>) {
    let exit = Arc::new(ExitSignal::new().unwrap());
    let threads = VcpuThreads::start(vcpus, io.clone(), exit.clone()).unwrap();
    assert!(io.control.set(threads.control().clone()).is_ok());
    (threads, exit)
}

/// The probe: each read reports its value as two dwords, so the guest
/// writes lo(X), hi(X), lo(Y), hi(Y), lo(X), hi(X).
fn probe() -> ProbeGuest {
    ProbeGuest::new().write(X, VX).read(X).write(Y, VY).read(Y).read(X)
}

#[test]
fn a_guest_saved_mid_run_resumes_on_a_fresh_vm_exactly_where_it_stopped() {
    let machine = machine();

    // Run until the guest has written lo(Y) and pause right there: KVM has
    // not completed that `out` yet.
    let (state, platform, first) = {
        let vm = new_vm(&machine);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let entry = probe().load(vm.memory(), PROBE_AT).unwrap();
        vcpu.enter_long_mode(entry).unwrap();
        let io = Arc::new(Io {
            hold_at_write: Some(3),
            ..Default::default()
        });
        run_and_save(&vm, vcpu, io)
    };
    assert_eq!(first.len(), 3, "the guest ran past the pause: {first:?}");
    assert_eq!(
        state.regs().unwrap().rax,
        VY,
        "rax holds the value whose low half was reported"
    );

    let vm = new_vm(&machine);
    let vcpu = restore(&vm, &state, &platform);
    let rest = run_to_hlt(vcpu, Arc::new(Io::default()), 3);
    let report = RunReport {
        port_writes: first.into_iter().chain(rest).collect(),
        ..Default::default()
    };
    assert_eq!(probe().decode(&report).unwrap(), [VX, VY, VX]);
}

/// Pauses the single vCPU running on `io` once `io` has seen
/// `hold_at_write`/`hold_at_read`, saves it and the platform from the
/// parked thread, stops it; returns the state, the platform and the
/// writes so far.
fn run_and_save(vm: &Vm, vcpu: Vcpu, io: Arc<Io>) -> (VcpuState, PlatformState, Vec<PortWrite>) {
    let msrs = state::migratable_msrs(vm.kvm(), vcpu.fd());
    assert!(msrs.contains(&state::MSR_IA32_TSC_DEADLINE), "{msrs:x?}");
    let (mut threads, exit) = start(vec![vcpu], &io);
    wait_for("the access to pause at", || {
        assert_eq!(exit.pending(), None);
        io.hold_at_write.is_some_and(|n| io.writes().len() >= n)
            || io.hold_at_read.is_some_and(|n| io.reads(REPORT_PORT) >= n)
    });
    threads.control().pause().unwrap();
    let states = threads.control().with_parked(move |v| v.save_state(&msrs)).unwrap();
    let platform = vm.save_platform().unwrap();
    threads.stop();
    assert_eq!(exit.pending(), None);
    let [state] = <[_; 1]>::try_from(states).unwrap();
    let state = state.unwrap();
    assert_eq!(state.id, 0);
    // Through a serializer, as a snapshot file holds it.
    let state = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    (state, platform, io.writes())
}

/// vCPU 0 of `vm` (fresh, its platform created) restored from `state`
/// and `platform`, in the VMM's order; its registers are the saved ones.
fn restore(vm: &Vm, state: &VcpuState, platform: &PlatformState) -> Vcpu {
    let vcpu = vm.create_bare_vcpu(0).unwrap();
    vm.restore_platform(platform).unwrap();
    vcpu.restore_state(state).unwrap();
    vm.set_clock(platform).unwrap();
    assert_eq!(vcpu.fd().get_regs().unwrap(), state.regs().unwrap());
    assert_eq!(vcpu.fd().get_sregs().unwrap(), state.sregs().unwrap());
    vcpu
}

/// Runs `vcpu` on `io` until it has written `writes` more times and
/// halted; returns its writes (checked to be `writes`, none too many).
fn run_to_hlt(vcpu: Vcpu, io: Arc<Io>, writes: usize) -> Vec<PortWrite> {
    let (mut threads, exit) = start(vec![vcpu], &io);
    wait_for("the guest's writes", || io.writes().len() >= writes);
    // Room for a write too many (an `out` done twice) to show up.
    std::thread::sleep(Duration::from_millis(50));
    threads.control().pause().unwrap();
    let mp_states = threads
        .control()
        .with_parked(|v| v.fd().get_mp_state().unwrap().mp_state)
        .unwrap();
    threads.stop();
    assert_eq!(exit.pending(), None);
    assert_eq!(mp_states, [KVM_MP_STATE_HALTED], "the guest ran to its hlt");
    let all = io.writes();
    assert_eq!(all.len(), writes, "after the restore: {all:?}");
    all
}

/// The port-read guest: four times `in eax, dx` (port 0xe0), `sub eax,
/// ecx` with ecx counting down from 4, `out dx, eax`; then `hlt`. With
/// reads answered 1, 2, 3, 4 it writes -3, -1, 1, 3.
const READ_LOOP: [u8; 18] = [
    0x66, 0xba, 0xe0, 0x00, // mov dx, 0xe0
    0xb9, 0x04, 0x00, 0x00, 0x00, // mov ecx, 4
    0xed, // in eax, dx
    0x29, 0xc8, // sub eax, ecx
    0xef, // out dx, eax
    0xff, 0xc9, // dec ecx
    0x75, 0xf8, // jnz back to the in
    0xf4, // hlt
];

#[test]
fn a_guest_saved_during_a_port_read_resumes_with_the_value_it_read() {
    let machine = machine();
    let expected: Vec<u32> = vec![(-3i32) as u32, (-1i32) as u32, 1, 3];
    let written = |w: &[PortWrite]| -> Vec<u32> {
        w.iter()
            .map(|w| u32::from_le_bytes(w.data.as_slice().try_into().unwrap()))
            .collect()
    };
    let load = |vm: &Vm| {
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let entry = ProbeGuest::new().load(vm.memory(), PROBE_AT).unwrap();
        memvisor_vmm::platform::write_guest(vm.memory(), entry.rip, &READ_LOOP).unwrap();
        vcpu.enter_long_mode(entry).unwrap();
        vcpu
    };

    // Uninterrupted.
    let vm = new_vm(&machine);
    let vcpu = load(&vm);
    assert_eq!(written(&run_to_hlt(vcpu, Arc::new(Io::default()), 4)), expected);
    drop(vm);

    // Paused inside the second read: KVM has the value but has not put it
    // in EAX yet.
    let (state, platform, first) = {
        let vm = new_vm(&machine);
        let vcpu = load(&vm);
        let io = Arc::new(Io {
            hold_at_read: Some(2),
            ..Default::default()
        });
        run_and_save(&vm, vcpu, io)
    };
    assert_eq!(written(&first), expected[..1]);
    assert_eq!(
        state.regs().unwrap().rax as u32,
        2,
        "the read completed before the save"
    );

    // Restored with the device's state (two reads answered) too.
    let vm = new_vm(&machine);
    let vcpu = restore(&vm, &state, &platform);
    let io = Arc::new(Io::default());
    io.reads[0].store(2, Ordering::SeqCst);
    let rest = run_to_hlt(vcpu, io.clone(), 3);
    assert_eq!(io.reads(REPORT_PORT), 4, "no read done twice");
    assert_eq!(written(&rest), expected[1..]);
}

/// The SSE guest: XMM3 = [`VX`], RAX cleared, `out` 0 (the pause point),
/// then report XMM3 as two dwords and `hlt`.
fn sse_guest() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xe0, 0x00]; // mov dx, 0xe0
    code.extend_from_slice(&[0x48, 0xb8]); // mov rax, VX
    code.extend_from_slice(&VX.to_le_bytes());
    code.extend_from_slice(&[
        0x66, 0x48, 0x0f, 0x6e, 0xd8, // movq xmm3, rax
        0x48, 0x31, 0xc0, // xor rax, rax
        0xef, // out dx, eax
        0x66, 0x48, 0x0f, 0x7e, 0xd8, // movq rax, xmm3
        0xef, // out dx, eax
        0x48, 0xc1, 0xe8, 0x20, // shr rax, 32
        0xef, // out dx, eax
        0xf4, // hlt
    ]);
    code
}

/// The x87 guest: `out` 0 (the pause point), then `fnstcw [X]` and
/// report the control word; `hlt`. (KVM emulates `fnstcw` where it traps,
/// from the vCPU's own FPU state.)
fn fcw_guest() -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xe0, 0x00]; // mov dx, 0xe0
    code.push(0xef); // out dx, eax
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, X
    code.extend_from_slice(&X.to_le_bytes());
    code.extend_from_slice(&[
        0xd9, 0x3b, // fnstcw [rbx]
        0x8b, 0x03, // mov eax, [rbx]
        0xef, // out dx, eax
        0xf4, // hlt
    ]);
    code
}

#[test]
fn the_fpu_state_travels_too() {
    const FCW: u32 = 0x27f; // KVM's reset value is 0x37f
    let machine = machine();
    let (state, platform, first) = {
        let vm = new_vm(&machine);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let entry = ProbeGuest::new().load(vm.memory(), PROBE_AT).unwrap();
        memvisor_vmm::platform::write_guest(vm.memory(), entry.rip, &fcw_guest()).unwrap();
        vcpu.enter_long_mode(entry).unwrap();
        // FCW in the XSAVE image, the x87 component marked in use
        // (XSTATE_BV bit 0): KVM_SET_FPU alone is not seen by the guest
        // on an XSAVE host while x87 is in its init state.
        let mut xsave = vcpu.fd().get_xsave().unwrap();
        xsave.region[0] = (xsave.region[0] & !0xffff) | FCW;
        xsave.region[128] |= 1;
        // SAFETY: a 4096-byte kvm_xsave read from this vCPU; this process
        // enables no dynamic XSTATE features, so KVM reads no more.
        unsafe { vcpu.fd().set_xsave(&xsave) }.unwrap();
        let io = Arc::new(Io {
            hold_at_write: Some(1),
            ..Default::default()
        });
        run_and_save(&vm, vcpu, io)
    };
    assert_eq!(first.len(), 1, "{first:?}");

    let vm = new_vm(&machine);
    let vcpu = restore(&vm, &state, &platform);
    let rest = run_to_hlt(vcpu, Arc::new(Io::default()), 1);
    let fcw = u32::from_le_bytes(rest[0].data.as_slice().try_into().unwrap()) & 0xffff;
    assert_eq!(fcw, FCW, "the FPU control word after the restore");
}

#[test]
#[ignore = "this host's PVM KVM cannot run SSE or x87 arithmetic in a hand-written guest (KVM internal error at \
            the first movq): run it with --ignored on a VMX or SVM host"]
fn the_vector_registers_travel_too() {
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    let machine = machine();
    let (state, platform, first) = {
        let vm = new_vm(&machine);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let entry = ProbeGuest::new().load(vm.memory(), PROBE_AT).unwrap();
        memvisor_vmm::platform::write_guest(vm.memory(), entry.rip, &sse_guest()).unwrap();
        vcpu.enter_long_mode(entry).unwrap();
        let mut sregs = vcpu.fd().get_sregs().unwrap();
        sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.cr0 |= (1 << 1) | (1 << 5);
        vcpu.fd().set_sregs(&sregs).unwrap();
        let io = Arc::new(Io {
            hold_at_write: Some(1),
            ..Default::default()
        });
        run_and_save(&vm, vcpu, io)
    };
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(state.regs().unwrap().rax, 0, "only XMM3 holds the value");

    let vm = new_vm(&machine);
    let vcpu = restore(&vm, &state, &platform);
    let rest = run_to_hlt(vcpu, Arc::new(Io::default()), 2);
    let report = RunReport {
        port_writes: rest,
        ..Default::default()
    };
    assert_eq!(ProbeGuest::new().read(X).decode(&report).unwrap(), [VX]);
}

/// A guest looping on `in eax, dx` with `dx` = `port`, at `at`; returns
/// the addresses of the `in` and of the `jmp` back to it.
fn in_loop(vm: &Vm, vcpu: &mut Vcpu, at: u64, port: u16) -> (u64, u64) {
    let entry = ProbeGuest::new().load(vm.memory(), at).unwrap();
    let mut code = vec![0x66, 0xba];
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xed, 0xeb, 0xfd]); // in eax, dx; jmp back to the in
    memvisor_vmm::platform::write_guest(vm.memory(), entry.rip, &code).unwrap();
    vcpu.enter_long_mode(entry).unwrap();
    (entry.rip + 4, entry.rip + 5)
}

#[test]
fn with_parked_runs_a_job_once_per_parked_vcpu_in_id_order() {
    let machine = machine();
    let vm = new_vm(&machine);
    let mut vcpus = Vec::new();
    let mut code = Vec::new();
    for id in 0..2u16 {
        let mut vcpu = vm.create_vcpu(u64::from(id)).unwrap();
        // An application processor waits for INIT-SIPI: let it run.
        vcpu.fd()
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .unwrap();
        code.push(in_loop(&vm, &mut vcpu, PROBE_AT * u64::from(id + 1), REPORT_PORT + id));
        vcpus.push(vcpu);
    }
    // Started with vCPU 1 first: the results still come in id order.
    vcpus.reverse();
    let io = Arc::new(Io::default());
    let (mut threads, exit) = start(vcpus, &io);
    let control = threads.control().clone();
    assert_eq!(control.with_parked(|v| v.id()), Err(PauseError::NotPaused));
    wait_for("both vCPUs to read", || io.reads(0xe0) > 10 && io.reads(0xe1) > 10);

    control.pause().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let job = {
        let calls = calls.clone();
        move |v: &mut Vcpu| {
            calls.fetch_add(1, Ordering::SeqCst);
            let regs = v.fd().get_regs().unwrap();
            (v.id(), regs.rip, regs.rax)
        }
    };
    let seen = control.with_parked(job.clone()).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let reads = [io.reads(0xe0), io.reads(0xe1)];
    for (id, &(vcpu, rip, rax)) in seen.iter().enumerate() {
        assert_eq!(vcpu, id as u64);
        let (in_at, jmp_at) = code[id];
        assert!(rip == in_at || rip == jmp_at, "vCPU {id} at {rip:#x}");
        // The `in` the vCPU exited for has been completed before it
        // parked: RAX holds the last value the VMM gave.
        assert_eq!(rax as u32, reads[id], "vCPU {id}: rax {rax:#x}");
    }
    // Parked: nothing runs. A second job runs again, once per vCPU.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!([io.reads(0xe0), io.reads(0xe1)], reads);
    assert_eq!(control.with_parked(job).unwrap(), seen);
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    control.resume().unwrap();
    wait_for("the vCPUs to run again", || {
        io.reads(0xe0) > reads[0] && io.reads(0xe1) > reads[1]
    });
    assert_eq!(control.with_parked(|v| v.id()), Err(PauseError::NotPaused));
    threads.stop();
    assert_eq!(exit.pending(), None);
}

#[test]
fn a_posted_job_runs_while_the_poster_goes_on_and_an_uncollected_one_is_withdrawn() {
    let machine = machine();
    let vm = new_vm(&machine);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    in_loop(&vm, &mut vcpu, PROBE_AT, REPORT_PORT);
    let io = Arc::new(Io::default());
    let (mut threads, exit) = start(vec![vcpu], &io);
    let control = threads.control().clone();
    assert!(matches!(control.post_parked(|v| v.id()), Err(PauseError::NotPaused)));
    control.pause().unwrap();

    // The job waits for a gate the poster opens after posting: had
    // post_parked waited for the job, this would never return.
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let posted = control
        .post_parked(move |v| {
            gate.lock().unwrap().recv().unwrap();
            v.id()
        })
        .unwrap();
    open.send(()).unwrap();
    assert_eq!(posted.collect().unwrap(), vec![0]);

    // Dropped without collecting, a job leaves the slot free: the next
    // job runs (and returns its own results).
    let ran = Arc::new(AtomicUsize::new(0));
    let job = {
        let ran = ran.clone();
        move |_: &mut Vcpu| ran.fetch_add(1, Ordering::SeqCst)
    };
    drop(control.post_parked(job.clone()).unwrap());
    let next = control.post_parked(|v| v.id() + 10).unwrap();
    assert_eq!(next.collect().unwrap(), vec![10]);
    assert!(ran.load(Ordering::SeqCst) <= 1);

    control.resume().unwrap();
    threads.stop();
    assert_eq!(exit.pending(), None);
}

#[test]
fn stopping_during_a_parked_job_does_not_deadlock() {
    let machine = machine();
    let vm = new_vm(&machine);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    in_loop(&vm, &mut vcpu, PROBE_AT, REPORT_PORT);
    let io = Arc::new(Io::default());
    let (mut threads, _exit) = start(vec![vcpu], &io);
    let control = threads.control().clone();
    control.pause().unwrap();
    let job = std::thread::spawn(move || control.with_parked(|_| std::thread::sleep(Duration::from_millis(200))));
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    threads.stop();
    assert!(started.elapsed() < WAIT);
    // The job was running: it finishes; either way with_parked returns.
    let result = job.join().unwrap();
    assert!(matches!(result, Ok(_) | Err(PauseError::Stopped { .. })), "{result:?}");
    // After the stop no job can run.
    let control = threads.control();
    assert!(matches!(
        control.with_parked(|_| ()),
        Err(PauseError::Stopped { .. } | PauseError::NotPaused)
    ));
}

#[test]
fn a_truncated_or_foreign_state_is_an_error_naming_the_field_and_sets_nothing() {
    let machine = machine();
    let vm = new_vm(&machine);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let entry = probe().load(vm.memory(), PROBE_AT).unwrap();
    vcpu.enter_long_mode(entry).unwrap();
    let msrs = state::migratable_msrs(vm.kvm(), vcpu.fd());
    let good = vcpu.save_state(&msrs).unwrap();
    let platform = vm.save_platform().unwrap();

    let target = new_vm(&machine);
    let fresh = target.create_bare_vcpu(0).unwrap();
    let before = fresh.fd().get_regs().unwrap();
    let mut bad = good.clone();
    bad.lapic.truncate(100);
    let err = state::restore_vcpu(fresh.fd(), &bad).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Length {
                field: "lapic",
                expected: 1024,
                got: 100
            }
        ),
        "{err}"
    );
    // Decoded before any ioctl: the registers were not touched.
    assert_eq!(fresh.fd().get_regs().unwrap(), before);

    let mut bad = good.clone();
    bad.regs.push(0);
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(StateError::Length { field: "regs", .. })
    ));
    let mut bad = good.clone();
    bad.id = 1;
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(StateError::WrongVcpu { state: 1, vcpu: 0 })
    ));

    // A garbled serialized state: an error, not a panic.
    let json = serde_json::to_string(&good).unwrap();
    let garbled = json.replacen("\"sregs\":[", "\"sregs\":[1,2,3,", 1);
    let garbled: VcpuState = serde_json::from_str(&garbled).unwrap();
    let err = fresh.restore_state(&garbled).unwrap_err();
    assert!(err.to_string().contains("sregs"), "{err}");

    let mut bad = platform.clone();
    bad.ioapic.clear();
    let err = target.restore_platform(&bad).unwrap_err();
    assert!(
        matches!(&err, VmError::State(StateError::Length { field: "ioapic", .. })),
        "{err}"
    );
    let mut bad = platform.clone();
    std::mem::swap(&mut bad.pic_master, &mut bad.pic_slave);
    let err = target.restore_platform(&bad).unwrap_err();
    assert!(err.to_string().contains("pic_master"), "{err}");
    let mut bad = platform.clone();
    bad.clock.truncate(8);
    assert!(target.set_clock(&bad).is_err());

    // The good state restores.
    target.restore_platform(&platform).unwrap();
    fresh.restore_state(&good).unwrap();
    target.set_clock(&platform).unwrap();
    assert_eq!(fresh.fd().get_regs().unwrap(), good.regs().unwrap());
}
