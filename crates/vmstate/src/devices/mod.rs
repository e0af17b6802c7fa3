//! Sections for memvisor's devices: virtio-mem, virtio-iommu and the DMA
//! layer.

pub mod dma;
pub mod virtio_iommu;
pub mod virtio_mem;

use std::io::Read;

use serde::de::DeserializeOwned;

use crate::error::SectionError;

/// Reads a whole (already bounded and checksummed) payload and decodes it
/// with postcard; trailing bytes are an error.
pub(crate) fn decode<T: DeserializeOwned>(payload: &mut dyn Read) -> Result<T, SectionError> {
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
