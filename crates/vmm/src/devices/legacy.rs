//! Power off and reset: the ACPI PM block of a hardware-reduced ACPI
//! machine (sleep control, sleep status and reset registers, described in
//! the FADT) and the i8042 controller's reset command.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::x86::layout::{PM_RESET_VALUE, S5_SLEEP_TYPE};

/// `SLP_EN` in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// The ACPI PM block at [`PM_PORT`](crate::x86::layout::PM_PORT): offset 0
/// sleep control, 1 sleep status, 2 reset.
#[derive(Debug)]
pub struct PmBlock {
    exit: Arc<ExitSignal>,
}

impl PmBlock {
    /// A PM block that raises its stops on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PmBlock {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 => {
                let sleep_type = (value >> 2) & 0x7;
                if sleep_type == S5_SLEEP_TYPE {
                    self.exit.raise(ExitReason::PowerOff);
                } else {
                    log::warn!("ACPI sleep type {sleep_type} requested; only S5 (power off) exists");
                }
            }
            2 if value == PM_RESET_VALUE => self.exit.raise(ExitReason::Reset),
            _ => log::debug!("PM block: write {value:#x} at offset {offset} ignored"),
        }
    }
}

/// Raises a reset when the i8042 is told to pulse the reset line.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.raise(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60 (offset 0) and 0x64 (offset 4); a guest writing
/// 0xfe to the command port resets the machine.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 that raises resets on `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.0.write(offset as u8, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_register_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = PmBlock::new(exit.clone());
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(exit.take(), None, "S3 is not offered");
        pm.write(0, &[S5_SLEEP_TYPE << 2]);
        assert_eq!(exit.take(), None, "without SLP_EN nothing happens");
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.take(), Some(ExitReason::PowerOff));
        pm.write(2, &[PM_RESET_VALUE]);
        assert_eq!(exit.take(), Some(ExitReason::Reset));
    }

    #[test]
    fn i8042_reset_command() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut kbd = I8042::new(exit.clone());
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.take(), Some(ExitReason::Reset));
    }
}
