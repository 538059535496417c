use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("test.toml"))
}

const GOOD: &str = r#"
cgroup = "rw-test"
hop_limit = 3
[access]
uids = [65534]
[[service]]
name = "audit"
listen = ["127.0.0.1:15001", "[::1]:15001"]
[[service.match]]
dst = ["127.0.0.0/8", "::1/128"]
ports = [8080, "9000-9010"]
[[service]]
name = "dlp"
listen = "127.0.0.1:15002"
match = { ports = 8080 }
"#;

#[test]
fn parses_a_full_config() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.cgroup, "rw-test");
    assert_eq!(c.hop_limit(), 3);
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.service_id("dlp"), Some(2));
    assert_eq!(c.service_name(1), Some("audit"));
    assert_eq!(c.chain_names(&[2, 1, 9]), ["dlp", "audit", "#9"]);
    let m = &c.services[0].matches[0];
    assert_eq!(m.ports, [PortRange { lo: 8080, hi: 8080 }, PortRange { lo: 9000, hi: 9010 }]);
    assert_eq!(c.services[1].listen_v6(), None);
    assert_eq!(c.access.uids, [Principal::Id(65534)]);
    assert_eq!(c.udp_idle(), std::time::Duration::from_millis(RW_DEFAULT_UDP_IDLE_MS));
    let udp =
        parse("udp_idle_ms = 1500\n[[service]]\nname = \"dns\"\nlisten = \"127.0.0.1:5353\"\nmatch = { protocol = \"udp\", ports = 53 }\n")
            .unwrap();
    assert_eq!(udp.services[0].matches[0].protocol, Protocol::Udp);
    assert_eq!(udp.udp_idle().as_millis(), 1500);
    assert_eq!(udp.services[0].udp_listen(), ["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]);
    assert_eq!(c.broadcast, BroadcastPolicy::Refuse);
    assert_eq!(c.broadcast_policy(&c.services[0].matches[0]), BroadcastPolicy::Refuse);
    let b = parse(
        "broadcast = \"pass\"\n[[service]]\nname = \"d\"\nlisten = \"127.0.0.1:9\"\n\
                       [[service.match]]\nports = 1\n[[service.match]]\nports = 2\nbroadcast = \"refuse\"\n",
    )
    .unwrap();
    assert_eq!(b.broadcast_policy(&b.services[0].matches[0]), BroadcastPolicy::Pass);
    assert_eq!(b.broadcast_policy(&b.services[0].matches[1]), BroadcastPolicy::Refuse);
    let three = parse("[[service]]\nname = \"dns\"\nlisten = [\"127.0.0.1:5353\", \"[::1]:5353\"]\nudp_ports = 3\nmatch = {}\n").unwrap();
    assert_eq!(three.services[0].udp_listen().len(), 6);
    assert_eq!(three.services[0].udp_listen()[5], "[::1]:5355".parse::<SocketAddr>().unwrap());
}

fn err(s: &str) -> (usize, String, String) {
    match parse(s).unwrap_err() {
        ConfigError::Invalid { line, key, message, .. } => (line, key, message),
        e => panic!("{e}"),
    }
}

#[test]
fn errors_name_line_and_key() {
    let (line, key, msg) = err("[[service]]\nname = \"a\"\nlisten = 5\nmatch = {}\n");
    assert_eq!((line, key.as_str()), (3, "listen"), "{msg}");
    let (line, key, _) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmatch = { dst = \"300.0.0.0/8\" }\n");
    assert_eq!((line, key.as_str()), (4, "match"));
    let (line, key, msg) = err("hop_limit = 0\n");
    assert_eq!((line, key.as_str()), (1, "hop_limit"), "{msg}");
    let (line, key, msg) = err("cgroup = \"x\"\nudp_idle_ms = 5\n");
    assert_eq!((line, key.as_str()), (2, "udp_idle_ms"), "{msg}");
    let (_, key, msg) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmatch = { protocol = \"sctp\" }\n");
    assert!(key == "match" && msg.contains("sctp"), "{key}: {msg}");
    let (line, key, msg) = err("\ncgroupp = \"x\"\n");
    assert_eq!(line, 2);
    assert!(msg.contains("cgroupp"), "{msg} {key}");
    let (line, _, msg) = err(&format!("{GOOD}[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:2\"\nmatch = {{}}\n"));
    assert!(msg.contains("duplicate"), "{msg}");
    assert_eq!(line, GOOD.lines().count() + 2);
    let (_, key, _) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmatch = { ports = \"9-1\" }\n");
    assert_eq!(key, "match");
    let (_, key, _) = err("[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\", \"127.0.0.2:1\"]\nmatch = {}\n");
    assert_eq!(key, "service.listen");
    let (_, key, _) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:65535\"\nudp_ports = 2\nmatch = {}\n");
    assert_eq!(key, "service.udp_ports");
    let (_, key, msg) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:100\"\nudp_ports = 3\nmatch = {}\n\
                                 [[service]]\nname = \"b\"\nlisten = \"127.0.0.1:102\"\nmatch = {}\n");
    assert!(key == "service.udp_ports" && msg.contains("overlap"), "{key}: {msg}");
    let (_, key, _) = err("[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:100\"\nmatch = {}\n");
    assert_eq!(key, "service.listen");
    let (_, key, _) = err("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nmatch = []\n");
    assert_eq!(key, "service.match");
}

#[test]
fn error_message_names_the_file() {
    let e = parse("hop_limit = 99\n").unwrap_err().to_string();
    assert!(e.starts_with("test.toml:1: key `hop_limit`"), "{e}");
}

#[test]
fn parent_is_delegated_or_a_cgroup_path() {
    for ok in ["delegated", "/", "/system.slice/rewire.service"] {
        let c = parse(&format!("parent = \"{ok}\"\n")).unwrap();
        assert_eq!(c.parent.as_ref().map(|p| p.get_ref().as_str()), Some(ok));
    }
    assert!(parse("").unwrap().parent.is_none());
    for bad in ["system.slice", "/a/../b", "self"] {
        let (line, key, msg) = err(&format!("\nparent = \"{bad}\"\n"));
        assert_eq!((line, key.as_str()), (2, "parent"), "{msg}");
    }
}
