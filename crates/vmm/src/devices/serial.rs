//! COM1: vm-superio's 16550 on port I/O, its interrupt an irqfd, its
//! output a writer (stdout, a file) and its input fed by the event loop.

use std::collections::VecDeque;
use std::io::{self, Write};

use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Most console input held while the guest does not read it; more is
/// dropped (and logged).
const MAX_PENDING_INPUT: usize = 64 << 10;

/// The interrupt line: an eventfd registered as the GSI's irqfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

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
            uart: Uart::new(IrqLine(irq), out),
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

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(offset);
            if offset == 0 {
                self.refill();
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
}
