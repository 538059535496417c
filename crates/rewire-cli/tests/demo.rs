//! `rewire demo` (the main job) runs and checks itself.

mod common;

#[test]
fn demo_passes() {
    common::require_root();
    let out = std::process::Command::new(common::REWIRE).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("-> audit -> dlp -> origin"), "{text}");
    assert!(text.contains("hop limit 1 reached"), "{text}");
    assert!(text.contains("demo passed"));
}
