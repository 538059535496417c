//! Where in the configuration text an error is: the line and the key a
//! message names, also for syntax errors the toml parser gives no key for.
//! Apart from the validation because it reads the raw text, not the values.

pub(super) fn find_key(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut off = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with(key) && line.contains('=') {
            return Some(off..off + line.len());
        }
        off += line.len();
    }
    None
}

/// The key written on the line holding byte `pos` (`a` in `a = 1`, or a table header).
/// A line that names none (a syntax error such as `= 1` or `[`) names the
/// table it is in, or `(top level)`: an error always names a key.
pub(super) fn key_at(text: &str, pos: usize) -> String {
    let start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("").trim();
    let key = match line.split_once('=') {
        Some((k, _)) => k.trim(),
        None => line.trim_matches(|c| c == '[' || c == ']').trim(),
    };
    if !key.is_empty() {
        return key.to_owned();
    }
    let table = text[..start].lines().rev().map(str::trim).find_map(|l| {
        let name = l.strip_prefix('[')?.split(']').next()?.trim_matches(|c| c == '[' || c == ' ');
        (!name.is_empty()).then_some(name)
    });
    table.unwrap_or("(top level)").to_owned()
}
