//! Byte sizes on the command line: `4096`, `512K`, `2M`, `1G`, `1T` (binary units).

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
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a size (examples: 4096, 512K, 2M, 1G)"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{text}' overflows 64 bits"))
}

/// Formats bytes with the largest binary unit that divides them evenly
/// enough to read well (one decimal).
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            return format!("{:.1} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512kb"), Ok(512 << 10));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert!(parse_size("x1").unwrap_err().contains("'x1'"));
        assert!(parse_size("99999999999T").unwrap_err().contains("overflows"));
    }

    #[test]
    fn formats() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(human(1 << 30), "1.0 GiB");
    }
}
