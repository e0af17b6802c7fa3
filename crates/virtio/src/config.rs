//! Configuration-space access at any offset and width.

/// Copies `config[offset..offset + data.len()]` into `data`, as a transport
/// reads a device's configuration space: any offset and width, with the
/// bytes past the end of the space read as zero (a driver reading out of
/// range gets zeros rather than an error; the host never panics).
pub fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(offset..) {
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_offset_and_width() {
        let cfg = [1u8, 2, 3, 4, 5, 6];
        let mut d = [0u8; 4];
        read_config(&cfg, 1, &mut d);
        assert_eq!(d, [2, 3, 4, 5]);
        read_config(&cfg, 4, &mut d);
        assert_eq!(d, [5, 6, 0, 0]);
        let mut d = [9u8; 2];
        read_config(&cfg, 100, &mut d);
        assert_eq!(d, [0, 0]);
        read_config(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
