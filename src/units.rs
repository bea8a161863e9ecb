//! Quantities as people write and read them: byte sizes with units (`512KiB`, `10M`) and counts
//! with the right plural. Settings parse with these and the front ends print with them, so what
//! Shoal prints can be pasted back into its configuration.

use bytesize::ByteSize;

/// The forms [`parse_bytes`] accepts, for error messages.
pub const BYTES_FORMS: &str =
    "a whole number of bytes or a number with a unit, such as 65536, 512KiB, 10M or 1GiB";

/// Parses a byte size: a plain integer is bytes; `K`, `M`, `G` (or `KB`, `MB`, `GB`) are powers
/// of 1000 and `KiB`, `MiB`, `GiB` powers of 1024, case-insensitive, with or without a space.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    let too_big = || format!("{text:?} is more bytes than any setting can hold");
    match text.parse::<ByteSize>() {
        // bytesize saturates on overflow instead of failing: a size this large is a mistake.
        Ok(size) if size.as_u64() == u64::MAX => Err(too_big()),
        Ok(_) if text.starts_with('-') => Err(format!("{text:?} is negative")),
        Ok(size) => Ok(size.as_u64()),
        Err(_) => Err(format!("{text:?} is not {BYTES_FORMS}")),
    }
}

/// A byte count for people: `512 bytes`, `1.5 MiB` (powers of 1024, as chunk sizes are).
pub fn bytes(n: u64) -> String {
    if n < 1024 {
        return count(n, "byte");
    }
    ByteSize(n).display().iec().to_string()
}

/// `1 chunk`, `2 chunks`, `0 chunks`: a number with its noun in the right number.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_integers_are_bytes_and_units_scale() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("10M"), Ok(10_000_000));
        assert_eq!(parse_bytes("4 KiB"), Ok(4096));
        assert_eq!(parse_bytes("64mib"), Ok(64 << 20));
    }

    #[test]
    fn nonsense_sizes_are_refused_with_the_accepted_forms() {
        for bad in ["big", "", "10 parsecs", "-5K"] {
            let err = parse_bytes(bad).unwrap_err();
            assert!(err.contains(&format!("{:?}", bad.trim())), "{err}");
        }
        assert!(parse_bytes("big").unwrap_err().contains("512KiB"));
        assert!(parse_bytes("99999999999EiB").is_err());
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(bytes(1), "1 byte");
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(parse_bytes(&bytes(64 * 1024)), Ok(64 * 1024));
    }

    #[test]
    fn counts_agree_with_their_number() {
        assert_eq!(count(1, "chunk"), "1 chunk");
        assert_eq!(count(0, "chunk"), "0 chunks");
        assert_eq!(count(3, "holder"), "3 holders");
    }
}
