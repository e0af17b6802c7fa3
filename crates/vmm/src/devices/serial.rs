//! COM1: vm-superio's 16550 on port I/O, its interrupt an irqfd, its
//! output a writer (stdout, a file) and its input fed by the event loop.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Most console input held while the guest does not read it; more is
/// dropped (and logged).
const MAX_PENDING_INPUT: usize = 64 << 10;

/// The 16550's receive FIFO (vm-superio's, not exported).
const UART_FIFO: usize = 64;

/// The 16550's IER bit enabling the received-data interrupt.
const IER_RDA: u8 = 0x01;
/// LCR: the divisor latch is mapped over the data registers.
const LCR_DLAB: u8 = 0x80;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR: received data available.
const IIR_RDA: u8 = 0x04;

/// The interrupt line: an eventfd registered as the GSI's irqfd (shared so
/// that rebuilding the UART from its state needs no new descriptor).
#[derive(Debug, Clone)]
pub struct IrqLine(Arc<EventFd>);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550 UART whose guest-side FIFO is refilled from pending input each
/// time the guest reads a byte.
pub struct Serial {
    uart: Uart<IrqLine, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
    dropped: u64,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").field("pending", &self.pending.len()).finish()
    }
}

impl Serial {
    /// A UART that signals `irq` and writes the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Uart::new(IrqLine(Arc::new(irq)), out),
            pending: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Console input for the guest: queued, and moved into the UART's FIFO
    /// as it has room.
    pub fn input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        if bytes.len() > room {
            self.dropped += (bytes.len() - room) as u64;
            log::warn!(
                "serial: the guest does not read its console; {} input bytes dropped so far",
                self.dropped
            );
        }
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.refill();
    }

    /// The UART's registers and FIFO plus the input not yet in the FIFO,
    /// for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        let u = self.uart.state();
        SerialSnapshot {
            registers: [
                u.baud_divisor_low,
                u.baud_divisor_high,
                u.interrupt_enable,
                u.interrupt_identification,
                u.line_control,
                u.line_status,
                u.modem_control,
                u.modem_status,
                u.scratch,
            ],
            fifo: u.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Takes the registers and input of `state`, keeping this UART's
    /// interrupt line and output. Refuses a FIFO longer than the UART's or
    /// more pending input than [`MAX_PENDING_INPUT`] (nothing changes then).
    pub fn restore(&mut self, state: &SerialSnapshot) -> Result<(), String> {
        if state.fifo.len() > UART_FIFO {
            return Err(format!(
                "a receive FIFO of {} bytes; the UART holds {UART_FIFO}",
                state.fifo.len()
            ));
        }
        if state.pending.len() > MAX_PENDING_INPUT {
            return Err(format!(
                "{} bytes of pending console input; at most {MAX_PENDING_INPUT}",
                state.pending.len()
            ));
        }
        let [
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
        ] = state.registers;
        self.set_registers(&vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.fifo.clone(),
        })?;
        self.pending = state.pending.iter().copied().collect();
        Ok(())
    }

    /// Rebuilds the UART from `registers`, keeping its interrupt line and
    /// output; vm-superio raises the interrupts `registers` mark pending.
    fn set_registers(&mut self, registers: &vm_superio::serial::SerialState) -> Result<(), String> {
        let irq = self.uart.interrupt_evt().clone();
        let out = std::mem::replace(&mut self.uart, Uart::new(irq.clone(), Box::new(io::sink()))).into_writer();
        // `from_state` fails only on a FIFO longer than the UART's (the
        // callers keep to it) or an irqfd that cannot be written; the output
        // is lost then.
        self.uart = Uart::from_state(registers, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("the UART state: {e:?}"))?;
        Ok(())
    }

    /// After the guest read the receive buffer: a 16550 keeps an interrupt
    /// pending while its FIFO holds data (received-data or character
    /// timeout), but vm-superio clears it on every read and raises it again
    /// only when a byte arrives. Linux's 8250 driver takes at most 256 bytes
    /// per interrupt, so once all input is in the FIFO a guest that stopped
    /// at 256 would never hear of the rest. Mark it pending again.
    fn data_left_interrupt(&mut self) {
        if !self.pending.is_empty() || self.uart.fifo_capacity() == UART_FIFO {
            return; // the refill raised it, or there is nothing to read
        }
        let mut registers = self.uart.state();
        if registers.line_control & LCR_DLAB != 0
            || registers.interrupt_enable & IER_RDA == 0
            || registers.interrupt_identification & IIR_RDA != 0
        {
            return;
        }
        registers.interrupt_identification = (registers.interrupt_identification & !IIR_NONE) | IIR_RDA;
        if let Err(e) = self.set_registers(&registers) {
            log::warn!("serial: raising the received-data interrupt: {e}");
        }
    }

    fn refill(&mut self) {
        let space = self.uart.fifo_capacity();
        if space == 0 || self.pending.is_empty() {
            return;
        }
        let chunk: Vec<u8> = self.pending.iter().take(space).copied().collect();
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("serial: queueing console input: {e:?}"),
        }
    }
}

/// [`Serial`]'s migratable state: the 16550's nine registers (divisor
/// low and high, IER, IIR, LCR, LSR, MCR, MSR, scratch), its receive FIFO
/// and the console input waiting for room in it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// The receive FIFO.
    pub fifo: Vec<u8>,
    /// Input not yet in the FIFO.
    pub pending: Vec<u8>,
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(offset);
            if offset == 0 {
                self.refill();
                self.data_left_interrupt();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(offset)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.uart.write(offset, b)
        {
            log::warn!("serial: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_larger_than_the_fifo() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&out.0.lock().unwrap()[..], b"hi");
        // Enable the data-ready interrupt (IER bit 0), then type 100 bytes.
        s.write(1, &[1]);
        let typed: Vec<u8> = (0..100u8).collect();
        s.input(&typed);
        assert!(irq.read().unwrap() >= 1);
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut lsr = [0];
            s.read(5, &mut lsr);
            assert_eq!(lsr[0] & 1, 1, "data ready while input is pending");
            let mut b = [0];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, typed);
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0);
    }

    /// Linux's 8250 interrupt handler, as far as input goes: on each
    /// interrupt it reads IIR and, unless that says none is pending, takes
    /// bytes while LSR says data is ready, at most 256 of them.
    fn linux_8250_reads(s: &mut Serial, irq: &EventFd, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            if irq.read().is_err() {
                break; // no interrupt comes: the guest waits for ever
            }
            let mut iir = [0];
            s.read(2, &mut iir);
            if iir[0] & IIR_NONE != 0 {
                continue;
            }
            for _ in 0..256 {
                let mut lsr = [0];
                s.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut b = [0];
                s.read(0, &mut b);
                got.push(b[0]);
            }
        }
        got
    }

    #[test]
    fn input_past_the_drivers_256_bytes_per_interrupt_all_arrives() {
        // 313 bytes: after the first interrupt's 256, the last 57 are all
        // in the FIFO and no new byte arrives to raise an interrupt.
        for len in [313usize, 256 + UART_FIFO, 257, 600] {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(Shared::default()));
            s.write(1, &[IER_RDA]);
            let typed: Vec<u8> = (0..len).map(|i| i as u8).collect();
            s.input(&typed);
            assert_eq!(linux_8250_reads(&mut s, &irq, len), typed, "{len} bytes of input");
        }
    }

    #[test]
    fn state_round_trip_keeps_registers_fifo_and_pending_input() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut a = Serial::new(irq.try_clone().unwrap(), Box::new(Shared::default()));
        a.write(3, &[0x80]); // DLAB on
        a.write(0, &[3]); // divisor 3
        a.write(3, &[0x03]); // 8N1, DLAB off
        a.write(1, &[1]); // data-ready interrupt
        a.write(7, &[0x5a]); // scratch
        let typed: Vec<u8> = (0..100u8).collect();
        a.input(&typed);
        let saved = a.state();
        assert_eq!(saved.fifo.len(), UART_FIFO);
        assert_eq!(saved.pending.len(), 100 - UART_FIFO);

        let out = Shared::default();
        let irq_b = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut b = Serial::new(irq_b.try_clone().unwrap(), Box::new(out.clone()));
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        // The pending data-ready interrupt is raised again on the new line.
        assert!(irq_b.read().unwrap() >= 1);
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut byte = [0];
            b.read(0, &mut byte);
            got.push(byte[0]);
        }
        assert_eq!(got, typed);
        let mut scratch = [0];
        b.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        // Output still goes to the new UART's writer.
        b.write(0, b"x");
        assert_eq!(&out.0.lock().unwrap()[..], b"x");
    }

    #[test]
    fn oversized_state_is_refused_and_changes_nothing() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq, Box::new(Shared::default()));
        let before = s.state();
        let mut bad = before.clone();
        bad.fifo = vec![0; UART_FIFO + 1];
        assert!(s.restore(&bad).unwrap_err().contains("FIFO"));
        let mut bad = before.clone();
        bad.pending = vec![0; MAX_PENDING_INPUT + 1];
        assert!(s.restore(&bad).unwrap_err().contains("pending"));
        assert_eq!(s.state(), before);
    }
}
