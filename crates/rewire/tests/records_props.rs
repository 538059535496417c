//! Property tests of the records decoder (`RedirectRecords::from_bytes`,
//! `from_hex`): it never panics on any input, accepts exactly the
//! well-formed blobs (checked against an independent reading of the layout
//! in `rewire_abi.h`), and encoding round-trips.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use rewire::{ParseError, RedirectRecords};

const LEN: usize = 128;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The fields of a blob, as `struct rw_records` lays them out.
#[derive(Clone, Debug)]
struct Fields {
    magic: u16,
    version: u8,
    n_chain: u8,
    proto: u8,
    flow_id: u64,
    family: u8,
    port: u16,
    addr: [u8; 16],
    chain: [u16; 16],
    /// Every other byte (pads, pid, uid, gid, cgroup id, comm, time, tag):
    /// the decoder keeps them as they are.
    rest: Vec<u8>,
}

/// Encodes by the documented layout (little-endian, port in network order).
fn encode(f: &Fields) -> Vec<u8> {
    let mut b = f.rest.clone();
    b.resize(LEN, 0);
    b[0..2].copy_from_slice(&f.magic.to_le_bytes());
    b[2] = f.version;
    b[3] = f.n_chain;
    b[4] = f.proto;
    b[8..16].copy_from_slice(&f.flow_id.to_le_bytes());
    b[16] = f.family;
    b[18..20].copy_from_slice(&f.port.to_be_bytes());
    b[24..40].copy_from_slice(&f.addr);
    for (i, c) in f.chain.iter().enumerate() {
        b[88 + 2 * i..90 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    b
}

/// What the decoder must say about `b`: the first check that fails, in order.
fn verdict(b: &[u8]) -> Result<(), ParseError> {
    if b.len() != LEN {
        return Err(ParseError::Length(b.len()));
    }
    if u16::from_le_bytes([b[0], b[1]]) != 0x5752 {
        return Err(ParseError::Magic);
    }
    if b[2] != 1 {
        return Err(ParseError::Version(b[2]));
    }
    if b[3] == 0 || b[3] > 16 {
        return Err(ParseError::Chain(b[3]));
    }
    if b[16] != AF_INET && b[16] != AF_INET6 {
        return Err(ParseError::Family(b[16]));
    }
    Ok(())
}

/// The original destination a well-formed blob names.
fn destination(b: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([b[18], b[19]]);
    if b[16] == AF_INET {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(b[24], b[25], b[26], b[27])), port)
    } else {
        // An IPv6 address carries its scope id (bytes 20..24, host order).
        let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[24..40]).unwrap());
        let scope = u32::from_ne_bytes(b[20..24].try_into().unwrap());
        SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope))
    }
}

/// Fields of a well-formed blob.
fn valid_fields() -> impl Strategy<Value = Fields> {
    (
        1u8..=16,
        any::<u8>(),
        any::<u64>(),
        prop_oneof![Just(AF_INET), Just(AF_INET6)],
        any::<u16>(),
        any::<[u8; 16]>(),
        any::<[u16; 16]>(),
        proptest::collection::vec(any::<u8>(), LEN),
    )
        .prop_map(|(n_chain, proto, flow_id, family, port, addr, chain, rest)| Fields {
            magic: 0x5752,
            version: 1,
            n_chain,
            proto,
            flow_id,
            family,
            port,
            addr,
            chain,
            rest,
        })
}

/// Fields near the valid ones: each header field often right, sometimes
/// wrong, so every check is exercised on its own.
fn near_valid_fields() -> impl Strategy<Value = Fields> {
    (
        valid_fields(),
        prop_oneof![4 => Just(0x5752u16), 1 => any::<u16>()],
        prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![4 => 1u8..=16, 1 => any::<u8>()],
        prop_oneof![4 => prop_oneof![Just(AF_INET), Just(AF_INET6)], 1 => any::<u8>()],
    )
        .prop_map(|(mut f, magic, version, n_chain, family)| {
            f.magic = magic;
            f.version = version;
            f.n_chain = n_chain;
            f.family = family;
            f
        })
}

/// Checks `from_bytes` (and the hex form) against the verdict.
fn check(b: &[u8]) -> Result<(), TestCaseError> {
    let got = RedirectRecords::from_bytes(b);
    let want = verdict(b);
    prop_assert_eq!(got.as_ref().err(), want.as_ref().err(), "bytes {:02x?}", b);
    if let Ok(r) = got {
        prop_assert_eq!(r.as_bytes(), b, "accepted bytes re-encode unchanged");
        prop_assert_eq!(r.chain(), &(0..b[3] as usize).map(|i| u16::from_le_bytes([b[88 + 2 * i], b[89 + 2 * i]])).collect::<Vec<_>>()[..]);
        prop_assert_eq!(r.original_destination(), destination(b));
        prop_assert_eq!(r.flow_id(), u64::from_le_bytes(b[8..16].try_into().unwrap()));
        let _ = format!("{r:?}");
        prop_assert_eq!(RedirectRecords::from_hex(&r.to_hex()), Ok(r.clone()));
    }
    // The hex form decides exactly as the bytes do.
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    prop_assert_eq!(RedirectRecords::from_hex(&hex).err(), want.err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Arbitrary bytes of any length: never a panic, the exact verdict.
    #[test]
    fn arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        check(&b)?;
    }

    /// Arbitrary bytes of exactly the blob's length.
    #[test]
    fn arbitrary_blobs(b in proptest::collection::vec(any::<u8>(), LEN)) {
        check(&b)?;
    }

    /// Blobs whose header fields are each right or wrong: accepted exactly
    /// when all are right.
    #[test]
    fn near_valid_blobs(f in near_valid_fields()) {
        check(&encode(&f))?;
    }

    /// Well-formed blobs are accepted and give back their fields; the
    /// bytes, hex and serde forms round-trip.
    #[test]
    fn well_formed_round_trip(f in valid_fields()) {
        let b = encode(&f);
        let r = RedirectRecords::from_bytes(&b).map_err(|e| TestCaseError::fail(format!("{e}: {f:?}")))?;
        prop_assert_eq!(r.as_bytes(), &b[..]);
        prop_assert_eq!(r.flow_id(), f.flow_id);
        prop_assert_eq!(r.chain(), &f.chain[..f.n_chain as usize]);
        prop_assert_eq!(r.original_destination(), destination(&b));
        prop_assert_eq!(r.original_destination().ip(), if f.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(f.addr[0], f.addr[1], f.addr[2], f.addr[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(f.addr))
        });
        prop_assert_eq!(r.original_destination().port(), f.port);
        prop_assert_eq!(RedirectRecords::from_hex(&r.to_hex()), Ok(r.clone()));
        prop_assert_eq!(RedirectRecords::from_hex(&r.to_hex().to_uppercase()), Ok(r.clone()));
        let json = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(serde_json::from_str::<RedirectRecords>(&json).unwrap(), r.clone());
        // Every id's state is defined by the chain.
        for id in 0..=20u16 {
            let _ = r.state_for(id);
        }
    }

    /// One byte of a well-formed blob changed, or the blob cut or extended:
    /// the verdict follows the byte's field.
    #[test]
    fn mutated_blobs(f in valid_fields(), at in 0usize..LEN, v in any::<u8>(), cut in 0usize..LEN + 8) {
        let mut b = encode(&f);
        b[at] = v;
        check(&b)?;
        b.resize(cut, 0);
        check(&b)?;
    }

    /// Any text given as hex: never a panic; accepted only when it is the
    /// hex of a well-formed blob.
    #[test]
    fn arbitrary_hex_text(s in "[0-9a-fA-FxX \u{e9}\u{1F600}-]{0,300}") {
        if let Ok(r) = RedirectRecords::from_hex(&s) {
            prop_assert_eq!(r.to_hex(), s.to_lowercase());
        }
    }
}
