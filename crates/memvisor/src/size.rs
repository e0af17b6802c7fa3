//! Byte sizes on the command line: `4096`, `512K`, `2M`, `1G`, `1T` (binary units).

pub use memvisor_machine::size::parse_size;

/// Parses a block size: a power of two of at least 4 KiB (the page size).
pub fn parse_block_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !size.is_power_of_two() || size < 4096 {
        return Err(format!(
            "block size '{text}' ({size} bytes) must be a power of two of at least 4K (the page size)"
        ));
    }
    Ok(size)
}

/// Parses a count of events that must be at least 1.
pub fn parse_events(text: &str) -> Result<std::num::NonZeroUsize, String> {
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of events"))?;
    std::num::NonZeroUsize::new(n)
        .ok_or_else(|| "0 events between migrations would migrate forever; give 1 or more".to_string())
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
        // Too large, however it is written: one message.
        let large = parse_size("99999999999T").unwrap_err();
        assert!(large.contains("larger than the largest size"), "{large}");
        assert_eq!(
            parse_size("18446744073709551616").unwrap_err(),
            large.replace("99999999999T", "18446744073709551616")
        );
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_block_size("1K").unwrap_err().contains("at least 4K"));
        assert!(parse_block_size("3M").unwrap_err().contains("power of two"));
        assert_eq!(parse_block_size("2M"), Ok(2 << 20));
        assert!(parse_events("0").unwrap_err().contains("1 or more"));
        assert_eq!(parse_events("7").map(|n| n.get()), Ok(7));
    }

    #[test]
    fn formats() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(human(1 << 30), "1.0 GiB");
    }
}
