//! The redirect records blob: what a proxy queries from its accepted socket
//! and sets, unchanged, on its outbound socket.
//!
//! Callers treat it as opaque, as on Windows. Its encoding is stable and
//! versioned (`struct rw_records` in `rewire_abi.h`, little-endian, 128
//! bytes, `magic = 0x5752`, `version = 1`) so it can be stored or sent to
//! another process. The last 8 bytes are a SipHash-2-4 MAC under a key only
//! the kernel programs hold: user space can read the fields but any change,
//! truncation, or reuse for another destination is refused by the kernel.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::abi::{self, RwRecords};

/// Why bytes are not a well-formed records blob (checked in user space; the
/// kernel additionally checks the MAC).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The blob is not exactly [`RedirectRecords::ENCODED_LEN`] bytes long.
    #[error("records blob is {0} bytes, expected {len}", len = RedirectRecords::ENCODED_LEN)]
    Length(usize),
    /// The magic number is wrong: not a rewire blob.
    #[error("not a rewire records blob (bad magic)")]
    Magic,
    /// An encoding version this library does not know.
    #[error("unsupported records version {0}")]
    Version(u8),
    /// The chain length is outside 1..=16.
    #[error("invalid chain length {0}")]
    Chain(u8),
    /// The original destination is not an IPv4 or IPv6 address.
    #[error("invalid original destination family {0}")]
    Family(u8),
    /// Not valid hex (for the text form).
    #[error("records text is not valid hex")]
    Hex,
}

/// The redirect records of one flow: which services handled it, in order,
/// and where it was going. Opaque to proxies; readable for logging.
#[derive(Clone, PartialEq, Eq)]
pub struct RedirectRecords {
    raw: RwRecords,
}

impl RedirectRecords {
    /// Size of the encoded blob in bytes.
    pub const ENCODED_LEN: usize = std::mem::size_of::<RwRecords>();

    /// Parses and structurally checks an encoded blob.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ParseError> {
        if bytes.len() != Self::ENCODED_LEN {
            return Err(ParseError::Length(bytes.len()));
        }
        let raw: RwRecords = abi::read_pod(bytes).expect("length checked");
        if raw.magic != abi::RW_MAGIC {
            return Err(ParseError::Magic);
        }
        if raw.version != abi::RW_VERSION {
            return Err(ParseError::Version(raw.version));
        }
        if raw.n_chain == 0 || raw.n_chain as usize > abi::RW_MAX_CHAIN {
            return Err(ParseError::Chain(raw.n_chain));
        }
        raw.orig_dst.to_socket_addr().ok_or(ParseError::Family(raw.orig_dst.family))?;
        Ok(Self { raw })
    }

    /// The encoded blob, to pass to [`crate::set_redirect_records`] or store.
    pub fn as_bytes(&self) -> &[u8] {
        abi::pod_bytes(&self.raw)
    }

    /// Random identifier of the flow, the same at every hop.
    pub fn flow_id(&self) -> u64 {
        self.raw.flow_id
    }

    /// Service ids (1-based, in configuration order) that handled the flow, first to last.
    pub fn chain(&self) -> &[u16] {
        &self.raw.chain[..self.raw.n_chain as usize]
    }

    /// Where the application originally connected.
    pub fn original_destination(&self) -> SocketAddr {
        self.raw.orig_dst.to_socket_addr().expect("checked at construction")
    }

    /// The redirect state of `service_id` for this flow, as WFP defines it.
    pub fn state_for(&self, service_id: u16) -> crate::RedirectState {
        crate::RedirectState::of(self.chain(), service_id)
    }

    /// Lower-case hex of the blob (the form used by `serde`).
    pub fn to_hex(&self) -> String {
        self.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Result<Self, ParseError> {
        if !s.len().is_multiple_of(2) || !s.is_ascii() {
            return Err(ParseError::Hex);
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| ParseError::Hex))
            .collect::<Result<Vec<u8>, _>>()?;
        Self::from_bytes(&bytes)
    }
}

impl std::fmt::Debug for RedirectRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedirectRecords")
            .field("flow_id", &format_args!("{:016x}", self.flow_id()))
            .field("chain", &self.chain())
            .field("original_destination", &self.original_destination())
            .finish()
    }
}

impl Serialize for RedirectRecords {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for RedirectRecords {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) fn sample(chain: &[u16], dst: SocketAddr) -> RedirectRecords {
    let mut raw = RwRecords {
        magic: abi::RW_MAGIC,
        version: abi::RW_VERSION,
        n_chain: chain.len() as u8,
        proto: libc::IPPROTO_TCP as u8,
        flow_id: 0x1122_3344_5566_7788,
        orig_dst: dst.into(),
        pid: 42,
        ..Default::default()
    };
    raw.chain[..chain.len()].copy_from_slice(chain);
    RedirectRecords { raw }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_bytes_and_hex() {
        let r = sample(&[1, 2], "127.0.0.1:8080".parse().unwrap());
        let back = RedirectRecords::from_bytes(r.as_bytes()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.chain(), &[1, 2]);
        assert_eq!(back.original_destination(), "127.0.0.1:8080".parse().unwrap());
        let json = serde_json::to_string(&r).unwrap();
        let de: RedirectRecords = serde_json::from_str(&json).unwrap();
        assert_eq!(de, r);
        let r6 = sample(&[3], "[::1]:443".parse().unwrap());
        assert_eq!(RedirectRecords::from_hex(&r6.to_hex()).unwrap().original_destination(), "[::1]:443".parse().unwrap());
    }

    #[test]
    fn encoding_is_stable() {
        let r = sample(&[7], "10.1.2.3:80".parse().unwrap());
        let b = r.as_bytes();
        assert_eq!(&b[0..4], &[0x52, 0x57, 1, 1]); // magic LE, version, n_chain
        assert_eq!(b[4], 6); // TCP
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(b[16], 2); // AF_INET
        assert_eq!(&b[18..20], &[0, 80]); // port, network order
        assert_eq!(&b[24..28], &[10, 1, 2, 3]);
        assert_eq!(&b[88..90], &[7, 0]); // chain[0]
    }

    #[test]
    fn rejects_malformed() {
        let r = sample(&[1], "127.0.0.1:1".parse().unwrap());
        let good = r.as_bytes().to_vec();
        assert_eq!(RedirectRecords::from_bytes(&good[..127]), Err(ParseError::Length(127)));
        assert_eq!(RedirectRecords::from_bytes(&[]), Err(ParseError::Length(0)));
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(RedirectRecords::from_bytes(&b), Err(ParseError::Magic));
        let mut b = good.clone();
        b[2] = 9;
        assert_eq!(RedirectRecords::from_bytes(&b), Err(ParseError::Version(9)));
        for n in [0u8, 17, 255] {
            let mut b = good.clone();
            b[3] = n;
            assert_eq!(RedirectRecords::from_bytes(&b), Err(ParseError::Chain(n)));
        }
        let mut b = good.clone();
        b[16] = 1;
        assert_eq!(RedirectRecords::from_bytes(&b), Err(ParseError::Family(1)));
        assert_eq!(RedirectRecords::from_hex("zz"), Err(ParseError::Hex));
        assert_eq!(RedirectRecords::from_hex("abc"), Err(ParseError::Hex));
    }

    /// Bounded random-mutation fuzzing of the parser: it never panics, and
    /// whatever it accepts re-encodes to the same bytes.
    #[test]
    fn fuzz_parser_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5257);
        let base = sample(&[1, 2, 3], "[::1]:9".parse().unwrap()).as_bytes().to_vec();
        for _ in 0..200_000 {
            let mut b = if rng.gen_bool(0.1) {
                let n = rng.gen_range(0..260);
                (0..n).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                base.clone()
            };
            for _ in 0..rng.gen_range(0..4) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            if let Ok(r) = RedirectRecords::from_bytes(&b) {
                assert_eq!(r.as_bytes(), &b[..]);
                let _ = (r.chain(), r.original_destination(), format!("{r:?}"));
            }
            let _ = RedirectRecords::from_hex(&String::from_utf8_lossy(&b));
        }
    }
}
