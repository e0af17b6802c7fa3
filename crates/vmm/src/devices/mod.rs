//! The platform's legacy devices: the 16550 serial port, the ACPI PM
//! block (power off and reset) and the i8042 (reset only).

pub mod legacy;
pub mod serial;
