//! Property tests of the configuration parser: on any text it never
//! panics and every error names `file:line: key`; generated valid configs
//! (in several TOML styles) parse and give back every field; a valid config
//! with one fault injected fails with the fault's line and key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use rewire_control::config::{ConfigError, Dst, FailPolicy, PortRange, Principal, Protocol};
use rewire_control::Config;

const FILE: &str = "props.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

/// An error must be `Invalid`, name this file, a line of the text (or the
/// one after the last) and a non-empty key, and say so in its message.
fn check_error(text: &str, e: &ConfigError) -> Result<(usize, String), TestCaseError> {
    let ConfigError::Invalid { file, line, key, message } = e else {
        return Err(TestCaseError::fail(format!("not an Invalid error: {e}")));
    };
    prop_assert_eq!(file.as_path(), Path::new(FILE));
    let lines = text.split('\n').count();
    prop_assert!(*line >= 1 && *line <= lines, "line {} of {} lines: {}\n{}", line, lines, e, text);
    prop_assert!(!key.trim().is_empty(), "no key named: {}\n---\n{}", e, text);
    prop_assert!(!message.is_empty());
    prop_assert!(e.to_string().starts_with(&format!("{FILE}:{line}: key `{key}`: ")), "{}", e);
    Ok((*line, key.clone()))
}

// ---- arbitrary TOML-ish text ------------------------------------------------

fn fragment() -> impl Strategy<Value = String> {
    let words: Vec<&'static str> = vec![
        "[[service]]\n",
        "[[service.match]]\n",
        "[access]\n",
        "[service]\n",
        "name = ",
        "listen = ",
        "hop_limit = ",
        "udp_idle_ms = ",
        "cgroup = ",
        "udp_ports = ",
        "fail = ",
        "user = ",
        "match = ",
        "ports = ",
        "dst = ",
        "protocol = ",
        "uid = ",
        "uids = ",
        "gids = ",
        "\"audit\"",
        "\"127.0.0.1:15001\"",
        "\"[::1]:15001\"",
        "[\"127.0.0.1:1\", \"[::1]:1\"]",
        "\"local\"",
        "\"10.0.0.0/8\"",
        "\"8000-8100\"",
        "\"9-1\"",
        "\"udp\"",
        "\"any\"",
        "\"open\"",
        "\"closed\"",
        "\"sctp\"",
        "{",
        "}",
        "{ ports = 80 }",
        "[",
        "]",
        "\"",
        "'",
        "'''",
        "\"\"\"",
        "=",
        ",",
        ".",
        "#",
        "\n",
        "\n",
        "\n",
        " ",
        "\t",
        "\r\n",
        "0",
        "1",
        "8",
        "17",
        "65535",
        "65536",
        "-1",
        "3.5",
        "true",
        "1979-05-27",
        "\u{e9}",
        "\u{1F600}",
        "\\",
        "\\u00e9",
        "\u{0}",
    ];
    prop_oneof![
        4 => proptest::sample::select(words).prop_map(str::to_owned),
        1 => "[ -~\n\u{e9}\u{3b1}\u{1F600}]{0,12}",
    ]
}

fn toml_ish() -> impl Strategy<Value = String> {
    proptest::collection::vec(fragment(), 0..40).prop_map(|v| v.concat())
}

// ---- valid configs ----------------------------------------------------------

#[derive(Clone, Debug)]
struct Rule {
    dst: Vec<Dst>,
    ports: Vec<PortRange>,
    protocol: Option<Protocol>,
    uid: Option<u32>,
    cgroup: Option<String>,
}

#[derive(Clone, Debug)]
struct Svc {
    name: String,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    port: u16,
    udp_ports: Option<u8>,
    fail: Option<FailPolicy>,
    user: Option<u32>,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Cfg {
    cgroup: Option<String>,
    hop_limit: Option<u32>,
    udp_idle_ms: Option<u64>,
    uids: Vec<u32>,
    services: Vec<Svc>,
    /// Rendering style: match rules as tables (true) or inline.
    tables: bool,
    /// Single values written without brackets where possible.
    bare: bool,
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9_-]{0,20}"
}

fn dst() -> impl Strategy<Value = Dst> {
    prop_oneof![
        1 => Just(Dst::Local),
        3 => (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| Dst::Net(IpNet::V4(Ipv4Net::new(a.into(), p).unwrap()))),
        3 => (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| Dst::Net(IpNet::V6(Ipv6Net::new(a.into(), p).unwrap()))),
    ]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        any::<u16>().prop_map(|p| PortRange { lo: p, hi: p }),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| PortRange { lo: a.min(b), hi: a.max(b) }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        proptest::collection::vec(dst(), 0..3),
        proptest::collection::vec(port_range(), 0..3),
        proptest::option::of(prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Any)]),
        proptest::option::of(any::<u32>()),
        proptest::option::of(
            "[a-z0-9_][a-z0-9_-]{0,8}(/[a-z0-9_][a-z0-9_-]{0,8}){0,2}"
                .prop_filter("not services", |c| c != "services" && !c.starts_with("services/")),
        ),
    )
        .prop_map(|(dst, ports, protocol, uid, cgroup)| Rule { dst, ports, protocol, uid, cgroup })
}

fn svc(i: usize) -> impl Strategy<Value = Svc> {
    (
        name(),
        proptest::option::of(any::<[u8; 4]>().prop_filter("specified", |a| *a != [0; 4]).prop_map(Ipv4Addr::from)),
        proptest::option::of(any::<[u8; 16]>().prop_filter("specified", |a| *a != [0; 16]).prop_map(Ipv6Addr::from)),
        any::<bool>(),
        1u16..10,
        proptest::option::of(1u8..=8),
        proptest::option::of(prop_oneof![Just(FailPolicy::Closed), Just(FailPolicy::Open)]),
        proptest::option::of(1u32..=u32::MAX),
        proptest::collection::vec(rule(), 1..3),
    )
        .prop_map(move |(n, v4, v6, six_if_none, port_off, udp_ports, fail, user, rules)| {
            let (v4, v6) = match (v4, v6) {
                (None, None) if six_if_none => (None, Some(Ipv6Addr::LOCALHOST)),
                (None, None) => (Some(Ipv4Addr::LOCALHOST), None),
                x => x,
            };
            Svc {
                // Unique: the position is part of the name.
                name: format!("{n}{i}"),
                v4,
                v6,
                // Services 20 ports apart: their UDP ranges never overlap.
                port: 1000 + 20 * i as u16 + port_off,
                udp_ports,
                fail,
                user,
                rules,
            }
        })
}

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        proptest::option::of(name().prop_filter("not starting with -", |n| !n.starts_with('-'))),
        proptest::option::of(1u32..=16),
        proptest::option::of(100u64..=3_600_000),
        proptest::collection::vec(any::<u32>(), 0..3),
        (0usize..5).prop_flat_map(|n| (0..n).map(svc).collect::<Vec<_>>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(cgroup, hop_limit, udp_idle_ms, uids, services, tables, bare)| Cfg {
            cgroup,
            hop_limit,
            udp_idle_ms,
            uids,
            services,
            tables,
            bare,
        })
}

fn q(s: impl std::fmt::Display) -> String {
    format!("\"{s}\"")
}

fn list(items: &[String], bare: bool) -> String {
    if bare && items.len() == 1 {
        items[0].clone()
    } else {
        format!("[{}]", items.join(", "))
    }
}

fn dst_text(d: &Dst) -> String {
    match d {
        Dst::Local => q("local"),
        Dst::Net(n) => q(n),
    }
}

fn port_text(p: &PortRange, i: usize) -> String {
    // Singles alternately as numbers and as strings.
    if p.lo == p.hi && i.is_multiple_of(2) {
        p.lo.to_string()
    } else if p.lo == p.hi {
        q(p.lo)
    } else {
        q(format!("{}-{}", p.lo, p.hi))
    }
}

fn protocol_text(p: Protocol) -> String {
    q(p)
}

/// The TOML text of `c`, one key per line; and, for each service, the line
/// of its `name`.
fn render(c: &Cfg) -> (String, Vec<usize>) {
    let mut out: Vec<String> = vec!["# generated".into()];
    if let Some(g) = &c.cgroup {
        out.push(format!("cgroup = {}", q(g)));
    }
    if let Some(h) = c.hop_limit {
        out.push(format!("hop_limit = {h}"));
    }
    if let Some(u) = c.udp_idle_ms {
        out.push(format!("udp_idle_ms = {u}"));
    }
    if !c.uids.is_empty() {
        out.push("[access]".into());
        out.push(format!("uids = [{}]", c.uids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")));
    }
    let mut name_lines = vec![];
    for s in &c.services {
        out.push(String::new());
        out.push("[[service]]".into());
        out.push(format!("name = {}", q(&s.name)));
        name_lines.push(out.len());
        let listen: Vec<String> =
            s.v4.map(|a| q(SocketAddr::new(IpAddr::V4(a), s.port)))
                .into_iter()
                .chain(s.v6.map(|a| q(SocketAddr::new(IpAddr::V6(a), s.port))))
                .collect();
        out.push(format!("listen = {}", list(&listen, c.bare)));
        if let Some(u) = s.udp_ports {
            out.push(format!("udp_ports = {u}"));
        }
        if let Some(f) = s.fail {
            out.push(format!("fail = {}", q(if f == FailPolicy::Open { "open" } else { "closed" })));
        }
        if let Some(u) = s.user {
            out.push(format!("user = {u}"));
        }
        let fields = |r: &Rule| {
            let mut f = vec![];
            if !r.dst.is_empty() {
                f.push(format!("dst = {}", list(&r.dst.iter().map(dst_text).collect::<Vec<_>>(), c.bare)));
            }
            if !r.ports.is_empty() {
                let p: Vec<String> = r.ports.iter().enumerate().map(|(i, p)| port_text(p, i)).collect();
                f.push(format!("ports = {}", list(&p, c.bare)));
            }
            if let Some(p) = r.protocol {
                f.push(format!("protocol = {}", protocol_text(p)));
            }
            if let Some(u) = r.uid {
                f.push(format!("uid = {u}"));
            }
            if let Some(g) = &r.cgroup {
                f.push(format!("cgroup = {}", q(g)));
            }
            f
        };
        if c.tables {
            for r in &s.rules {
                out.push("[[service.match]]".into());
                out.extend(fields(r));
            }
        } else {
            let inline: Vec<String> = s.rules.iter().map(|r| format!("{{ {} }}", fields(r).join(", "))).collect();
            out.push(format!("match = {}", list(&inline, c.bare)));
        }
    }
    (out.join("\n") + "\n", name_lines)
}

fn rules_after_expansion(c: &Cfg) -> usize {
    c.services.iter().flat_map(|s| &s.rules).map(|r| r.dst.len().max(1) * r.ports.len().max(1)).sum()
}

/// Every field of `c` as parsed.
fn check_fields(c: &Cfg, p: &Config) -> Result<(), TestCaseError> {
    prop_assert_eq!(&p.cgroup, c.cgroup.as_deref().unwrap_or("rewire"));
    prop_assert_eq!(p.hop_limit(), c.hop_limit.unwrap_or(rewire::abi::RW_DEFAULT_HOP_LIMIT));
    prop_assert_eq!(p.udp_idle().as_millis() as u64, c.udp_idle_ms.unwrap_or(rewire::abi::RW_DEFAULT_UDP_IDLE_MS));
    prop_assert_eq!(&p.access.uids, &c.uids.iter().map(|u| Principal::Id(*u)).collect::<Vec<_>>());
    prop_assert_eq!(p.services.len(), c.services.len());
    for (i, (g, s)) in c.services.iter().zip(&p.services).enumerate() {
        prop_assert_eq!(s.name.get_ref(), &g.name);
        prop_assert_eq!(p.service_id(&g.name), Some(i as u16 + 1));
        prop_assert_eq!(s.listen_v4(), g.v4.map(|a| SocketAddr::new(IpAddr::V4(a), g.port)));
        prop_assert_eq!(s.listen_v6(), g.v6.map(|a| SocketAddr::new(IpAddr::V6(a), g.port)));
        prop_assert_eq!(s.listen.len(), g.v4.is_some() as usize + g.v6.is_some() as usize);
        prop_assert_eq!(s.udp_ports, g.udp_ports.unwrap_or(1));
        prop_assert_eq!(s.udp_listen().len(), s.listen.len() * s.udp_ports as usize);
        prop_assert_eq!(s.fail, g.fail.unwrap_or(FailPolicy::Closed));
        prop_assert_eq!(&s.user, &g.user.map(Principal::Id));
        prop_assert_eq!(s.matches.len(), g.rules.len());
        for (m, r) in s.matches.iter().zip(&g.rules) {
            prop_assert_eq!(&m.dst, &r.dst);
            prop_assert_eq!(&m.ports, &r.ports);
            prop_assert_eq!(m.protocol, r.protocol.unwrap_or(Protocol::Tcp));
            prop_assert_eq!(&m.uid, &r.uid.map(Principal::Id));
            prop_assert_eq!(&m.cgroup, &r.cgroup);
        }
    }
    Ok(())
}

// ---- one fault in a valid config --------------------------------------------

/// A fault: what to do to the rendered lines, and the key it must name.
#[derive(Clone, Debug)]
enum Fault {
    HopLimit(u32),
    UdpIdle(u64),
    Cgroup(String),
    UnknownTop(String),
    WrongType,
    ServiceName(String),
    Duplicate,
    ListenPortZero,
    ListenUnspecified,
    UdpPorts(u8),
    Protocol(String),
    BackwardsRange(u16, u16),
    BadDst(String),
    UnknownInMatch,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        prop_oneof![Just(0u32), 17u32..100_000].prop_map(Fault::HopLimit),
        prop_oneof![0u64..100, 3_600_001u64..u32::MAX as u64].prop_map(Fault::UdpIdle),
        prop_oneof![
            Just(String::new()),
            Just("-x".to_owned()),
            Just("a b".to_owned()),
            Just("a/b".to_owned()),
            Just("x".repeat(65)),
            "[a-z]{1,5}[./ :\u{e9}][a-z]{0,5}",
        ]
        .prop_map(Fault::Cgroup),
        "zz[a-z_]{0,8}".prop_map(Fault::UnknownTop),
        Just(Fault::WrongType),
        prop_oneof![Just(String::new()), Just("-a".to_owned()), Just("a.b".to_owned()), "[a-z]{1,4}[ /\u{e9}][a-z]{0,4}"]
            .prop_map(Fault::ServiceName),
        Just(Fault::Duplicate),
        Just(Fault::ListenPortZero),
        Just(Fault::ListenUnspecified),
        prop_oneof![Just(0u8), 9u8..=255].prop_map(Fault::UdpPorts),
        "(sctp|icmp|TCP|udp4|)".prop_map(Fault::Protocol),
        (1u16..u16::MAX).prop_flat_map(|big| (Just(big), 0..big)).prop_map(|(big, small)| Fault::BackwardsRange(big, small)),
        prop_oneof![Just("300.0.0.0/8"), Just("10.0.0.0/33"), Just("::1/129"), Just("localhost"), Just("")]
            .prop_map(|s| Fault::BadDst(s.to_owned())),
        Just(Fault::UnknownInMatch),
    ]
}

/// Injects `f` into the lines of a valid config with at least one service
/// (rendered with tables); returns the text and the (line, key) the error must name.
fn inject(c: &Cfg, f: &Fault) -> (String, usize, String) {
    let (text, name_lines) = render(c);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let top = 1; // after "# generated": top-level keys go here
    let set_top = |lines: &mut Vec<String>, key: &str, value: String| -> usize {
        let tables = lines.iter().position(|l| l.starts_with('[')).unwrap_or(lines.len());
        if let Some(i) = lines[..tables].iter().position(|l| l.starts_with(&format!("{key} = "))) {
            lines[i] = format!("{key} = {value}");
            i + 1
        } else {
            lines.insert(top, format!("{key} = {value}"));
            top + 1
        }
    };
    // Lines of the first service's first match table, and of its name.
    let first_name = name_lines[0];
    let first_match = lines.iter().position(|l| l == "[[service.match]]").unwrap() + 1;
    let (line, key) = match f {
        Fault::HopLimit(h) => (set_top(&mut lines, "hop_limit", h.to_string()), "hop_limit"),
        Fault::UdpIdle(u) => (set_top(&mut lines, "udp_idle_ms", u.to_string()), "udp_idle_ms"),
        Fault::Cgroup(g) => (set_top(&mut lines, "cgroup", toml_str(g)), "cgroup"),
        Fault::UnknownTop(k) => {
            lines.insert(top, format!("{k} = 1"));
            return (lines.join("\n") + "\n", top + 1, k.clone());
        }
        Fault::WrongType => (set_top(&mut lines, "hop_limit", q("eight")), "hop_limit"),
        Fault::ServiceName(n) => {
            lines[first_name - 1] = format!("name = {}", toml_str(n));
            (first_name, "service.name")
        }
        Fault::Duplicate => {
            let dup = c.services[0].name.clone();
            lines.push("[[service]]".into());
            lines.push(format!("name = {}", q(&dup)));
            let at = lines.len();
            lines.push("listen = \"127.0.0.1:60000\"".into());
            lines.push("match = {}".into());
            (at, "service.name")
        }
        Fault::ListenPortZero | Fault::ListenUnspecified => {
            let l = if matches!(f, Fault::ListenPortZero) { "127.0.0.1:0" } else { "0.0.0.0:80" };
            let i = (first_name..lines.len()).find(|&i| lines[i].starts_with("listen = ")).unwrap();
            lines[i] = format!("listen = {}", q(l));
            (first_name, "service.listen")
        }
        Fault::UdpPorts(n) => {
            lines.retain(|l| !l.starts_with("udp_ports = "));
            lines.insert(first_name, format!("udp_ports = {n}"));
            (first_name, "service.udp_ports")
        }
        // A fault inside a match table is located at the table's header,
        // `[[service.match]]` (its value is read as a whole, so the toml
        // crate's span is the table's), and names `service.match`; the
        // message names the bad value.
        Fault::Protocol(p) => {
            lines.retain(|l| !l.starts_with("protocol = "));
            let first_match = lines.iter().position(|l| l == "[[service.match]]").unwrap() + 1;
            lines.insert(first_match, format!("protocol = {}", q(p)));
            (first_match, "service.match")
        }
        Fault::BackwardsRange(hi, lo) => {
            lines.retain(|l| !l.starts_with("ports = "));
            let first_match = lines.iter().position(|l| l == "[[service.match]]").unwrap() + 1;
            lines.insert(first_match, format!("ports = [80, {}]", q(format!("{hi}-{lo}"))));
            (first_match, "service.match")
        }
        Fault::BadDst(d) => {
            lines.retain(|l| !l.starts_with("dst = "));
            let first_match = lines.iter().position(|l| l == "[[service.match]]").unwrap() + 1;
            lines.insert(first_match, format!("dst = {}", q(d)));
            (first_match, "service.match")
        }
        Fault::UnknownInMatch => {
            lines.insert(first_match, "dest = \"10.0.0.0/8\"".into());
            (first_match, "service.match")
        }
    };
    (lines.join("\n") + "\n", line, key.to_owned())
}

/// A TOML basic string of any text.
fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any text: no panic; an error names file, line and key.
    #[test]
    fn arbitrary_text_never_panics(text in toml_ish()) {
        if let Err(e) = parse(&text) {
            check_error(&text, &e)?;
        }
    }

    /// Arbitrary printable text and unicode, not only TOML-like.
    #[test]
    fn arbitrary_chars_never_panic(text in "\\PC{0,200}") {
        if let Err(e) = parse(&text) {
            check_error(&text, &e)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Generated valid configs parse, in every style, and give back every
    /// field (or, with more than 64 rules after expansion, are refused
    /// naming `service.match`).
    #[test]
    fn valid_configs_round_trip(c in cfg()) {
        let (text, _) = render(&c);
        match parse(&text) {
            Ok(p) => {
                prop_assert!(rules_after_expansion(&c) <= rewire::abi::RW_MAX_RULES, "accepted {} rules", rules_after_expansion(&c));
                check_fields(&c, &p)?;
            }
            Err(e) => {
                let (_, key) = check_error(&text, &e)?;
                prop_assert!(rules_after_expansion(&c) > rewire::abi::RW_MAX_RULES && key == "service.match", "{}\n---\n{}", e, text);
            }
        }
    }

    /// One fault in a valid config: refused, naming the fault's line and key.
    #[test]
    fn one_fault_names_its_line_and_key(
        c in cfg().prop_filter("a service", |c| !c.services.is_empty() && rules_after_expansion(c) <= 32),
        f in fault(),
    ) {
        let c = Cfg { tables: true, ..c };
        let (text, line, key) = inject(&c, &f);
        let e = match parse(&text) {
            Ok(_) => return Err(TestCaseError::fail(format!("{f:?} accepted:\n{text}"))),
            Err(e) => e,
        };
        let (got_line, got_key) = check_error(&text, &e)?;
        prop_assert_eq!((got_line, got_key.as_str()), (line, key.as_str()), "{:?}: {}\n---\n{}", f, e, text);
    }
}

/// Cases the properties found: a syntax error on a line without a key
/// named no key (`key ``), and one at the end of the file had no message.
#[test]
fn syntax_errors_name_a_key_and_say_what() {
    for (text, line, key) in [
        ("=", 1, "(top level)"),
        ("name = \"audit\"\n[", 2, "(top level)"),
        ("[[service]]\nname = \"a\"\n= 1\n", 3, "service"),
        ("hop_limit = ", 1, "hop_limit"),
    ] {
        let e = parse(text).unwrap_err();
        let ConfigError::Invalid { line: l, key: k, message, .. } = &e else { panic!("{e}") };
        assert_eq!((*l, k.as_str()), (line, key), "{text:?}: {e}");
        assert!(!message.trim().is_empty(), "{text:?}: {e}");
    }
}
