//! The encoding of section payloads: serde state through postcard. Devices
//! implement their own [`Section`](crate::Section)s (in their `persist.rs`)
//! and encode with these two functions, so every section reads and writes
//! the same way and no device depends on the encoder.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::SectionError;

/// Encodes `value` and writes it as the whole payload.
pub fn encode<T: Serialize + ?Sized>(value: &T, out: &mut dyn Write) -> Result<(), SectionError> {
    out.write_all(&postcard::to_allocvec(value)?)?;
    Ok(())
}

/// Reads a whole (already bounded and checksummed) payload and decodes it;
/// trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &mut dyn Read) -> Result<T, SectionError> {
    let mut bytes = Vec::new();
    payload.read_to_end(&mut bytes)?;
    let (value, rest) = postcard::take_from_bytes(&bytes)?;
    if !rest.is_empty() {
        return Err(SectionError::Invalid(format!(
            "{} bytes follow the encoded state",
            rest.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_trailing_bytes() {
        let mut bytes = Vec::new();
        encode(&(7u32, String::from("seven")), &mut bytes).unwrap();
        let back: (u32, String) = decode(&mut &bytes[..]).unwrap();
        assert_eq!(back, (7, "seven".to_string()));
        bytes.push(0);
        let err = decode::<(u32, String)>(&mut &bytes[..]).unwrap_err().to_string();
        assert!(err.contains("1 bytes follow"), "{err}");
    }
}
