//! A service's context layout: what the C surface's context query answers
//! the service (`context = ...` in its `[[service]]` entry).
//!
//! On Windows the context is whatever the service's callout driver wrote, so
//! a port reads its own callout's layout. The config names one of three per
//! service; the type lives here so the config (rewire-control) and the C
//! surface (rewire-capi), which reads the same file, parse it the same way.
//!
//! ```toml
//! context = "rewire"                   # struct rw_context (the default)
//! context = "sockaddrs"                # two SOCKADDR_STORAGE: original remote, original local
//! context = { hex = "52570001..." }    # opaque vendor bytes
//! context = { base64 = "UlcAAQ==" }    # the same, base64 (standard alphabet, padded)
//! ```

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;

/// Most vendor context bytes a service may have (a Windows context query's
/// output is usually sized at about 1 KB).
pub const MAX_VENDOR_CONTEXT: usize = 1024;

/// What the context query answers a service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ContextLayout {
    /// rewire's `struct rw_context` (152 bytes).
    #[default]
    Rewire,
    /// Two `SOCKADDR_STORAGE` (256 bytes): the original remote address, then
    /// the original local one (the application's socket as the service sees it).
    Sockaddrs,
    /// These bytes, the same for every flow of the service (1 to [`MAX_VENDOR_CONTEXT`]).
    Vendor(Vec<u8>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Name(String),
    Bytes(Encoded),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Encoded {
    hex: Option<String>,
    base64: Option<String>,
}

impl<'de> Deserialize<'de> for ContextLayout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = match Raw::deserialize(d)
            .map_err(|_| D::Error::custom(r#"context: "rewire", "sockaddrs", { hex = "..." } or { base64 = "..." }"#))?
        {
            Raw::Name(n) if n == "rewire" => return Ok(ContextLayout::Rewire),
            Raw::Name(n) if n == "sockaddrs" => return Ok(ContextLayout::Sockaddrs),
            Raw::Name(n) => {
                return Err(D::Error::custom(format!(
                    r#"context "{n}": use "rewire", "sockaddrs", {{ hex = ".." }} or {{ base64 = ".." }}"#
                )))
            }
            Raw::Bytes(Encoded { hex: Some(h), base64: None }) => decode_hex(&h),
            Raw::Bytes(Encoded { hex: None, base64: Some(b) }) => decode_base64(&b),
            Raw::Bytes(_) => return Err(D::Error::custom("context: give exactly one of hex or base64")),
        }
        .map_err(D::Error::custom)?;
        if bytes.is_empty() || bytes.len() > MAX_VENDOR_CONTEXT {
            return Err(D::Error::custom(format!("context: {} vendor bytes; 1 to {MAX_VENDOR_CONTEXT} are allowed", bytes.len())));
        }
        Ok(ContextLayout::Vendor(bytes))
    }
}

/// Hex digits (upper or lower case, whitespace ignored) to bytes.
fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("context hex: an odd number of digits".into());
    }
    let val = |c: u8| (c as char).to_digit(16).ok_or_else(|| format!("context hex: '{}' is no hex digit", c as char));
    digits.chunks(2).map(|p| Ok((val(p[0])? * 16 + val(p[1])?) as u8)).collect()
}

/// Standard base64 (RFC 4648, `=` padding required, whitespace ignored) to bytes.
fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    let chars: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !chars.len().is_multiple_of(4) {
        return Err("context base64: the length is not a multiple of 4 (padding with '=' is required)".into());
    }
    let val = |c: u8| -> Result<u32, String> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("context base64: '{}' is not in the standard alphabet", c as char)),
        } as u32)
    };
    let mut out = Vec::with_capacity(chars.len() / 4 * 3);
    let groups = chars.len() / 4;
    for (i, g) in chars.chunks(4).enumerate() {
        let pad = g.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != groups) || g[..4 - pad].contains(&b'=') {
            return Err("context base64: misplaced '=' padding".into());
        }
        let mut n = 0u32;
        for &c in &g[..4 - pad] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct S {
        #[serde(default)]
        context: ContextLayout,
    }

    fn parse(s: &str) -> Result<ContextLayout, String> {
        serde_json::from_str::<S>(s).map(|s| s.context).map_err(|e| e.to_string())
    }

    #[test]
    fn names_hex_and_base64() {
        assert_eq!(parse("{}").unwrap(), ContextLayout::Rewire);
        assert_eq!(parse(r#"{"context":"rewire"}"#).unwrap(), ContextLayout::Rewire);
        assert_eq!(parse(r#"{"context":"sockaddrs"}"#).unwrap(), ContextLayout::Sockaddrs);
        assert_eq!(parse(r#"{"context":{"hex":"00ff 10Ab"}}"#).unwrap(), ContextLayout::Vendor(vec![0, 0xff, 0x10, 0xab]));
        assert_eq!(parse(r#"{"context":{"base64":"AP8Qqw=="}}"#).unwrap(), ContextLayout::Vendor(vec![0, 0xff, 0x10, 0xab]));
        assert_eq!(parse(r#"{"context":{"base64":"TWFu"}}"#).unwrap(), ContextLayout::Vendor(b"Man".to_vec()));
        assert_eq!(parse(r#"{"context":{"base64":"TWE="}}"#).unwrap(), ContextLayout::Vendor(b"Ma".to_vec()));
    }

    #[test]
    fn refuses_bad_values_and_sizes() {
        for bad in [
            r#"{"context":"other"}"#,
            r#"{"context":{"hex":"abc"}}"#,
            r#"{"context":{"hex":"zz"}}"#,
            r#"{"context":{"hex":""}}"#,
            r#"{"context":{"base64":"TWE"}}"#,
            r#"{"context":{"base64":"T=E="}}"#,
            r#"{"context":{"base64":"TW-u"}}"#,
            r#"{"context":{"hex":"00","base64":"AA=="}}"#,
            r#"{"context":{"text":"x"}}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let max = "ab".repeat(MAX_VENDOR_CONTEXT);
        assert_eq!(parse(&format!(r#"{{"context":{{"hex":"{max}"}}}}"#)).unwrap(), ContextLayout::Vendor(vec![0xab; MAX_VENDOR_CONTEXT]));
        let over = "ab".repeat(MAX_VENDOR_CONTEXT + 1);
        assert!(parse(&format!(r#"{{"context":{{"hex":"{over}"}}}}"#)).unwrap_err().contains("1 to 1024"));
    }
}
