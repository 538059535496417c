//! The kernel ABI has one source, `bpf/rewire_abi.h`; `rewire::abi` is its
//! Rust view. This test fails on any difference between the two:
//!
//! - every struct of the header (found in its text, laid out by the C
//!   compiler: the BTF of the header compiled for BPF): its size and each
//!   field's name, offset and size, against the Rust struct's
//!   (`size_of`, `offset_of!`; an exhaustive pattern makes a Rust field the
//!   list below forgets a compile error);
//! - every `RW_*` constant of the header (names found in its text, values as
//!   the C compiler evaluates them), against the Rust constant of the same
//!   name, and every `pub const RW_*` of `abi.rs` against the header;
//! - the maps of the compiled objects: each map user space reads or writes
//!   has the key and value types the table below names, of the Rust size;
//!   a map both the hooks and another object declare (the guard's counters,
//!   the scope program's stash) is declared alike; a map nobody classified
//!   fails the test.
//!
//! It needs clang and bpftool (`scripts/setup.sh` installs them) and fails,
//! never skips, without them.

use std::{
    collections::{BTreeMap, BTreeSet},
    mem::{offset_of, size_of},
    path::{Path, PathBuf},
    process::Command,
};

use rewire::abi::*;
use serde_json::Value;

/// A struct as one side lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    size: usize,
    /// (name, offset, size), by offset.
    fields: Vec<(String, usize, usize)>,
}

/// A map as an object declares it (types by their C names).
#[derive(Clone, Debug, PartialEq, Eq)]
struct MapDecl {
    key: String,
    key_size: usize,
    value: String,
    value_size: usize,
    max_entries: u64,
}

/// The size of the field `f` returns a reference to.
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// The Rust view of a C struct: `view!("rw_addr" => RwAddr { family, ... })`.
macro_rules! view {
    ($c:literal => $t:ident { $($f:ident),* $(,)? }) => {{
        // Names every field: a Rust field missing from the list does not compile.
        #[allow(dead_code)]
        fn exhaustive(v: $t) {
            let $t { $($f: _),* } = v;
        }
        let fields = vec![$((stringify!($f).to_string(), offset_of!($t, $f), field_size::<$t, _>(|s| &s.$f))),*];
        ($c, Layout { size: size_of::<$t>(), fields })
    }};
}

fn rust_structs() -> BTreeMap<&'static str, Layout> {
    BTreeMap::from([
        view!("rw_addr" => RwAddr { family, _pad, port_be, scope_id, addr }),
        view!("rw_records" => RwRecords {
            magic, version, n_chain, proto, depth, _pad, flow_id, orig_dst, pid, uid, gid, origin_sel, cgroup_id, comm,
            created_ns, chain, mac
        }),
        view!("rw_context" => RwContext { magic, version, state, service_id, rule_id, hop, _pad, redirected_ns, records }),
        view!("rw_sock" => RwSock { flags, service_id, rule_id, redirected_ns, cookie, n_set, _pad, mark, rec }),
        view!("rw_tuple" => RwTuple { family, _pad, cport, sport, caddr, saddr }),
        view!("rw_service" => RwService {
            has_v4, has_v6, port4_be, port6_be, udp_ports, fail_open, addr4, addr6, continue_unlinked, _pad2, upto_mask
        }),
        view!("rw_rule" => RwRule {
            service_id, rule_id, family, proto, has_uid, has_cgroup, port_lo, port_hi, uid, addr, mask, cgroup_id, flags,
            sel
        }),
        view!("rw_conf" => RwConf {
            n_rules, hop_limit, key, udp_idle_ns, svc_ids, udp_flows_per_user, netns_cookie, n_sel, accel_bound
        }),
        view!("rw_sel" => RwSel { kind, level, id, dev }),
        view!("rw_udp_handoff" => RwUdpHandoff { s, published_ns }),
        view!("rw_ident_key" => RwIdentKey { kind, _pad, id }),
        view!("rw_link_key" => RwLinkKey { tgid, _pad, dst }),
        view!("rw_link" => RwLink { ts_ns, pending, service_id, ambiguous, _pad, rec }),
        view!("rw_access_key" => RwAccessKey { kind, id }),
        view!("rw_guard_conf" => RwGuardConf { subtree_id, services_id, level, _pad }),
        view!("rw_flow_rec" => RwFlowRec {
            source, role, sk_state, _pad, sk_proto, service_id, redirected_ns, last_ns, cookie, rec
        }),
        view!("rw_event" => RwEvent {
            kind, err, flow_id, service_id, rule_id, n_chain, proto, hop_limit, pid, comm, uid, ts_ns, orig_dst, chain
        }),
    ])
}

/// The Rust constants, by name: `consts![RW_SOL, ...]`.
macro_rules! consts {
    ($($c:ident),* $(,)?) => {
        BTreeMap::from([$((stringify!($c), $c as i128)),*])
    };
}

fn rust_constants() -> BTreeMap<&'static str, i128> {
    consts![
        RW_SOL,
        RW_OPT_RECORDS,
        RW_OPT_CONTEXT,
        RW_OPT_UDP_PEER,
        RW_MAGIC,
        RW_VERSION,
        RW_MAX_CHAIN,
        RW_MAX_SERVICES,
        RW_MAX_RULES,
        RW_DEFAULT_HOP_LIMIT,
        RW_UDP_SLOTS,
        RW_MAX_UDP_PORTS,
        RW_DEFAULT_UDP_IDLE_MS,
        RW_DEFAULT_UDP_FLOWS_PER_USER,
        RW_OPT_ACCEL,
        RW_ACCEL_BYTES,
        RW_ACCEL_TCP_BYTES,
        RW_ACCEL_FALLBACKS,
        RW_ACCEL_BOUND,
        RW_ACCEL_INSERTED,
        RW_ACCEL_REFUSED,
        RW_ACCEL_SWITCHES,
        RW_ACCEL_N,
        RW_DEFAULT_ACCEL_BOUND,
        RW_MAC_COVERS,
        RW_STATE_NOT_REDIRECTED,
        RW_STATE_REDIRECTED_BY_SELF,
        RW_STATE_REDIRECTED_BY_OTHER,
        RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF,
        RW_REASON_REDIRECT,
        RW_REASON_DELIVER,
        RW_REASON_HOP_LIMIT,
        RW_REASON_MISMATCH,
        RW_REASON_UDP_CONFLICT,
        RW_REASON_NO_LISTENER,
        RW_REASON_IMPOSTOR,
        RW_REASON_NO_STORAGE,
        RW_REASON_HANDOFF_FULL,
        RW_REASON_FOREIGN_NETNS,
        RW_REASON_PROTOCOL,
        RW_REASON_UDP_FORGED,
        RW_REASON_HANDOFF_REFUSED,
        RW_REASON_FAIL_OPEN_SKIP,
        RW_REASON_EVENTS_LOST,
        RW_REASON_BORROWED,
        RW_REASON_BROADCAST,
        RW_REASON_LINK,
        RW_REASON_SIDE_DOOR,
        RW_REASON_UDP_NO_FLOW,
        RW_REASON_UDP_RATE,
        RW_REASON_N,
        RW_SVC_CNT_N,
        RW_RULE_BROADCAST_PASS,
        RW_MAX_BROADCAST,
        RW_MAX_SEL,
        RW_SEL_EXE_BASE,
        RW_SEL_CGROUP,
        RW_SEL_EXE,
        RW_SVC_IDS_FILLED,
        RW_FLOW_SOCK,
        RW_FLOW_UDP_SLOT,
        RW_FLOW_ROLE_REDIRECTED,
        RW_FLOW_ROLE_ACCEPTED,
        RW_FLOW_ROLE_SET,
    ]
}

/// The maps user space reads or writes: (map, key type, value type), as the
/// C names of the types (`__u32`, or a struct of the header).
const USER_MAPS: &[(&str, &str, &str)] = &[
    ("rw_conf", "__u32", "rw_conf"),
    ("rw_rules", "__u32", "rw_rule"),
    ("rw_services", "__u32", "rw_service"),
    ("rw_access", "rw_access_key", "__u8"),
    ("rw_handoff", "rw_tuple", "rw_sock"),
    ("rw_udp_handoff", "rw_tuple", "rw_udp_handoff"),
    ("rw_svc_addr", "rw_addr", "__u16"),
    ("rw_svc_id", "rw_ident_key", "__u16"),
    ("rw_link", "rw_link_key", "rw_link"),
    ("rw_bcast", "__u32", "__u8"),
    ("rw_counters", "__u32", "__u64"),
    ("rw_svc_counters", "__u32", "__u64"),
    ("rw_guard_conf", "__u32", "rw_guard_conf"),
    ("rw_sel", "__u32", "rw_sel"),
    ("rw_accel_cnt", "__u32", "__u64"),
];

/// Maps only the kernel programs read: not part of the ABI.
const KERNEL_MAPS: &[&str] = &[
    "rw_sk",
    "rw_udp_sk",
    "rw_udp_gone",
    "rw_udp_rate",
    "rw_owner",
    "rw_made_cg",
    "rw_link_sk",
    "rw_svc_state",
    "rw_svc_sock",
    "rw_scope",
    "rw_scratch",
    "rw_accel",
    "rw_accel_sk",
    "rw_accel_peer",
    "rw_events", // a ring buffer of struct rw_event (no key or value type)
];

fn scalar_size(name: &str) -> Option<usize> {
    Some(match name {
        "__u8" | "__s8" => 1,
        "__u16" | "__s16" => 2,
        "__u32" | "__s32" | "int" => 4,
        "__u64" | "__s64" => 8,
        _ => return None,
    })
}

fn header() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/rewire_abi.h")
}

fn clang() -> String {
    std::env::var("CLANG").unwrap_or_else(|_| "clang".into())
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("rewire-abi-drift-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}); bash scripts/setup.sh installs clang and bpftool"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The types of a BPF object's BTF, by id (`bpftool btf dump -j`).
struct Btf(BTreeMap<u64, Value>);

impl Btf {
    fn of(object: &Path) -> Self {
        let json: Value = serde_json::from_str(&run(Command::new("bpftool").args(["-j", "btf", "dump", "file"]).arg(object))).unwrap();
        Btf(json["types"].as_array().unwrap().iter().map(|t| (t["id"].as_u64().unwrap(), t.clone())).collect())
    }

    fn get(&self, id: u64) -> &Value {
        &self.0[&id]
    }

    /// Follows typedefs and qualifiers.
    fn strip(&self, mut id: u64) -> &Value {
        loop {
            let t = self.get(id);
            match t["kind"].as_str().unwrap() {
                "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => id = t["type_id"].as_u64().unwrap(),
                _ => return t,
            }
        }
    }

    fn size(&self, id: u64) -> usize {
        let t = self.strip(id);
        match t["kind"].as_str().unwrap() {
            "ARRAY" => t["nr_elems"].as_u64().unwrap() as usize * self.size(t["type_id"].as_u64().unwrap()),
            _ => t["size"].as_u64().unwrap_or_else(|| panic!("no size: {t}")) as usize,
        }
    }

    /// A type's name as the C source spells it (typedef names kept: `__u32`).
    fn name(&self, id: u64) -> String {
        let mut t = self.get(id);
        while matches!(t["kind"].as_str().unwrap(), "CONST" | "VOLATILE") {
            t = self.get(t["type_id"].as_u64().unwrap());
        }
        t["name"].as_str().unwrap_or("").to_string()
    }

    fn structs(&self) -> BTreeMap<String, Layout> {
        let mut out = BTreeMap::new();
        for t in self.0.values() {
            if t["kind"] != "STRUCT" || t["name"].as_str().unwrap_or("").is_empty() {
                continue;
            }
            let mut fields: Vec<_> = t["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let bits = m["bits_offset"].as_u64().unwrap();
                    assert_eq!(bits % 8, 0, "bit field in the ABI: {m}");
                    (m["name"].as_str().unwrap().to_string(), bits as usize / 8, self.size(m["type_id"].as_u64().unwrap()))
                })
                .collect();
            fields.sort_by_key(|f| f.1);
            out.insert(t["name"].as_str().unwrap().to_string(), Layout { size: t["size"].as_u64().unwrap() as usize, fields });
        }
        out
    }

    /// The maps of the object, by name.
    fn maps(&self) -> BTreeMap<String, MapDecl> {
        let mut out = BTreeMap::new();
        let Some(sec) = self.0.values().find(|t| t["kind"] == "DATASEC" && t["name"] == ".maps") else { return out };
        for v in sec["vars"].as_array().unwrap() {
            let var = self.get(v["type_id"].as_u64().unwrap());
            let def = self.strip(var["type_id"].as_u64().unwrap());
            let mut m = MapDecl { key: String::new(), key_size: 0, value: String::new(), value_size: 0, max_entries: 0 };
            for f in def["members"].as_array().unwrap() {
                let target = self.get(f["type_id"].as_u64().unwrap())["type_id"].as_u64().unwrap();
                match f["name"].as_str().unwrap() {
                    "key" => (m.key, m.key_size) = (self.name(target), self.size(target)),
                    "value" => (m.value, m.value_size) = (self.name(target), self.size(target)),
                    // __uint(max_entries, n): a pointer to an array of n.
                    "max_entries" => m.max_entries = self.strip(target)["nr_elems"].as_u64().unwrap(),
                    _ => {}
                }
            }
            out.insert(var["name"].as_str().unwrap().to_string(), m);
        }
        out
    }
}

/// The structs the header defines, laid out by the C compiler.
fn c_structs(dir: &Path) -> BTreeMap<String, Layout> {
    let text = std::fs::read_to_string(header()).unwrap();
    let names: BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("struct ")?.strip_suffix(" {")).filter(|n| n.starts_with("rw_")).collect();
    assert!(names.len() > 10, "found only {names:?} in the header");
    let mut src = format!("#include \"{}\"\n", header().display());
    for n in &names {
        src += &format!("struct {n} rw_drift_{n};\n");
    }
    let c = dir.join("structs.c");
    let o = dir.join("structs.o");
    std::fs::write(&c, src).unwrap();
    run(Command::new(clang()).args(["-target", "bpf", "-g", "-O2", "-c"]).arg(multiarch()).arg(&c).arg("-o").arg(&o));
    let all = Btf::of(&o).structs();
    names.iter().map(|n| (n.to_string(), all.get(*n).unwrap_or_else(|| panic!("struct {n} not in the BTF")).clone())).collect()
}

fn multiarch() -> String {
    format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH)
}

/// The header's `RW_*` object-like macros, evaluated by the C compiler.
fn c_constants(dir: &Path) -> BTreeMap<String, i128> {
    let text = std::fs::read_to_string(header()).unwrap();
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .map(|l| l.split(|c: char| c.is_whitespace()).next().unwrap())
        .filter(|n| n.starts_with("RW_") && !n.contains('('))
        .map(str::to_string)
        .collect();
    let mut src = format!("#include <stdio.h>\n#include \"{}\"\nint main(void) {{\n", header().display());
    for n in &names {
        src += &format!("\tprintf(\"%s %lld\\n\", \"{n}\", (long long)({n}));\n");
    }
    src += "\treturn 0;\n}\n";
    let c = dir.join("consts.c");
    let exe = dir.join("consts");
    std::fs::write(&c, src).unwrap();
    run(Command::new(clang()).args(["-Wall", "-Werror"]).arg(&c).arg("-o").arg(&exe));
    run(&mut Command::new(&exe))
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(' ').unwrap();
            (n.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn every_abi_struct_has_the_same_layout_in_c_and_rust() {
    let dir = Scratch::new("structs");
    let c = c_structs(&dir.0);
    let rust = rust_structs();
    let mut diffs = Vec::new();
    for (name, cl) in &c {
        match rust.get(name.as_str()) {
            None => diffs.push(format!("struct {name}: in the header, no Rust view")),
            Some(rl) if rl != cl => {
                let mut d = format!("struct {name}: C {} bytes, Rust {} bytes", cl.size, rl.size);
                for i in 0..cl.fields.len().max(rl.fields.len()) {
                    let (cf, rf) = (cl.fields.get(i), rl.fields.get(i));
                    if cf != rf {
                        d += &format!("\n  field {i}: C {cf:?}, Rust {rf:?} (name, offset, size)");
                    }
                }
                diffs.push(d);
            }
            Some(_) => {}
        }
    }
    for name in rust.keys() {
        if !c.contains_key(*name) {
            diffs.push(format!("struct {name}: a Rust view, not in the header"));
        }
    }
    assert!(diffs.is_empty(), "the C and Rust views of the ABI differ:\n{}", diffs.join("\n"));
}

#[test]
fn every_abi_constant_has_the_same_value_in_c_and_rust() {
    let dir = Scratch::new("consts");
    let c = c_constants(&dir.0);
    let rust = rust_constants();
    let mut diffs = Vec::new();
    for (name, v) in &c {
        match rust.get(name.as_str()) {
            None => diffs.push(format!("{name} = {v}: in the header, not in rewire::abi")),
            Some(r) if r != v => diffs.push(format!("{name}: C {v}, Rust {r}")),
            Some(_) => {}
        }
    }
    for name in rust.keys() {
        if !c.contains_key(*name) {
            diffs.push(format!("{name}: in rewire::abi, not in the header"));
        }
    }
    // Every constant of abi.rs is in the table above (so compared).
    let abi_rs = include_str!("../../rewire/src/abi.rs");
    for l in abi_rs.lines() {
        if let Some(name) = l.strip_prefix("pub const ").and_then(|r| r.split(':').next()) {
            if !rust.contains_key(name) {
                diffs.push(format!("{name}: in rewire::abi, not compared by this test (add it to rust_constants)"));
            }
        }
    }
    // The redirect states are rewire::RedirectState's values.
    for (s, c) in [
        (rewire::RedirectState::NotRedirected, RW_STATE_NOT_REDIRECTED),
        (rewire::RedirectState::RedirectedBySelf, RW_STATE_REDIRECTED_BY_SELF),
        (rewire::RedirectState::RedirectedByOther, RW_STATE_REDIRECTED_BY_OTHER),
        (rewire::RedirectState::PreviouslyRedirectedBySelf, RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF),
    ] {
        if s as u8 != c {
            diffs.push(format!("RedirectState::{s:?} = {}, RW_STATE_* = {c}", s as u8));
        }
    }
    assert!(diffs.is_empty(), "the C and Rust constants of the ABI differ:\n{}", diffs.join("\n"));
}

#[test]
fn the_compiled_objects_maps_have_the_abi_types() {
    let dir = Scratch::new("maps");
    let rust = rust_structs();
    let rust_size = |ty: &str| scalar_size(ty).or_else(|| rust.get(ty).map(|l| l.size));
    let objects = [
        ("rewire", rewire_bpf::object()),
        ("rewire-test", rewire_bpf::test_object()),
        ("guard", rewire_bpf::guard_object()),
        ("lsm", rewire_bpf::lsm_object()),
        ("scope", rewire_bpf::scope_object()),
        ("flows", rewire_bpf::flows_object()),
    ];
    let mut diffs = Vec::new();
    let mut seen: BTreeMap<String, (&str, MapDecl)> = BTreeMap::new();
    for (obj, bytes) in objects {
        let path = dir.0.join(format!("{obj}.bpf.o"));
        std::fs::write(&path, bytes).unwrap();
        let maps = Btf::of(&path).maps();
        assert!(!maps.is_empty(), "{obj}: no maps in its BTF");
        for (name, m) in maps {
            if let Some(&(_, k, v)) = USER_MAPS.iter().find(|(n, ..)| *n == name) {
                if m.key != k || m.value != v {
                    diffs.push(format!("{obj}: map {name} is {} -> {}, user space uses {k} -> {v}", m.key, m.value));
                }
                for (ty, size) in [(&m.key, m.key_size), (&m.value, m.value_size)] {
                    match rust_size(ty) {
                        Some(r) if r == size => {}
                        r => diffs.push(format!("{obj}: map {name}: {ty} is {size} bytes, its Rust view {r:?}")),
                    }
                }
            } else if !KERNEL_MAPS.contains(&name.as_str()) {
                diffs.push(format!("{obj}: map {name} is neither a user map nor a kernel map of this test"));
            }
            // A map several objects declare (its descriptor is shared) is declared alike.
            match seen.get(&name) {
                Some((first, m0)) if *m0 != m => diffs.push(format!("map {name}: {first} declares {m0:?}, {obj} {m:?}")),
                Some(_) => {}
                None => {
                    seen.insert(name, (obj, m));
                }
            }
        }
    }
    for (name, ..) in USER_MAPS {
        if !seen.contains_key(*name) {
            diffs.push(format!("map {name}: in the table, in no object"));
        }
    }
    assert!(diffs.is_empty(), "the maps of the compiled objects differ from the ABI:\n{}", diffs.join("\n"));
}
