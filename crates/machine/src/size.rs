//! Byte sizes as people write them: `4096`, `512K`, `2M`, `1G`, `1T` (binary units),
//! for the command line, configuration files and the management API.

/// Parses a byte size with an optional binary suffix (K, M, G, T; an
/// optional trailing `iB` or `B` is accepted, case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    // Wide enough that any number of digits that fits is told apart from
    // one that is not a number at all.
    let value: u128 = digits
        .trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => too_large(text),
            _ => format!("'{text}' is not a size (examples: 4096, 512K, 2M, 1G)"),
        })?;
    u64::try_from(value << shift).map_err(|_| too_large(text))
}

fn too_large(text: &str) -> String {
    format!("size '{text}' is larger than the largest size, 16 EiB - 1 (2^64 - 1 bytes)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2M "), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("3kb"), Ok(3 << 10));
        assert!(parse_size("1X").unwrap_err().contains("not a size"));
        assert!(parse_size("16777216T").unwrap_err().contains("larger than"));
    }
}
