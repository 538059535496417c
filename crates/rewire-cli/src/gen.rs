//! `rewire gen`: the man pages and shell completions, generated from the
//! same clap definition the command parses with, so they cannot drift from
//! it. The Debian package (scripts/package.sh) ships what this writes; an
//! admin without the package can run it too.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;

/// What `rewire gen` writes.
#[derive(clap::Args, Debug)]
pub struct GenArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Write one man page per command (rewire.1, rewire-run.1, ...) into DIR
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

pub fn main(a: GenArgs) -> anyhow::Result<()> {
    match a.what {
        What::Man { dir } => man(&dir).map(|_| ()),
        What::Completions { shell } => {
            let mut out = Vec::new();
            completions(shell, &mut out);
            std::io::stdout().lock().write_all(&out).context("writing the completions")
        }
    }
}

/// Writes the man pages into `dir` (`rewire.1`, and `rewire-run.1` etc.
/// for the commands, named as git's are); returns their paths.
fn man(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(crate::Cli::command(), dir).with_context(|| format!("writing the man pages into {}", dir.display()))?;
    let mut written = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "1") {
            written.push(path);
        }
    }
    written.sort();
    Ok(written)
}

fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(shell, &mut cmd, "rewire", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command is listed in `rewire --help`, each on one line with its
    /// own summary, the summary line of rewire itself does not name a subset
    /// of them (it once read "run, daemon, exec, proxy, demo"), and every
    /// command and argument has help text.
    #[test]
    fn every_command_is_listed_in_help_on_one_line() {
        let mut cmd = crate::Cli::command();
        cmd.build();
        let help = cmd.render_help().to_string();
        let first = help.lines().next().unwrap_or_default();
        let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| s.get_name() != "help").collect();
        assert!(subs.len() >= 10, "{help}");
        for sub in &subs {
            let name = sub.get_name();
            assert!(!sub.is_hide_set(), "{name} is hidden from --help");
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty() && !about.contains('\n'), "{name} has no one-line summary: {about:?}");
            let line = help.lines().find(|l| l.split_whitespace().next() == Some(name));
            let line = line.unwrap_or_else(|| panic!("{name} missing from --help:\n{help}"));
            assert!(line.ends_with(&about), "{name}'s line is not its summary: {line:?}");
            assert!(line.len() <= 100, "{name}'s line is longer than 100 columns: {line:?}");
            let word = |w: &str| first.split(|c: char| !c.is_alphanumeric()).any(|x| x == w);
            assert!(!word(name), "rewire's summary names {name} (a subset of the commands?): {first:?}");
            let long = (*sub).clone().render_long_help().to_string();
            assert!(long.len() > about.len(), "{name} --help has no text");
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                assert!(arg.get_help().is_some() || arg.get_long_help().is_some(), "{name} {id} has no help");
            }
        }
    }

    /// The man pages are written, one per command, and groff renders each
    /// (without warnings) into a page with the command's summary.
    #[test]
    fn man_pages_render() {
        let dir = std::env::temp_dir().join(format!("rewire-man-{}", std::process::id()));
        let pages = man(&dir).expect("writing the man pages");
        let cmd = crate::Cli::command();
        let mut names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        names.sort();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let page = format!("rewire-{}.1", sub.get_name());
            assert!(names.contains(&page), "{page} not written: {names:?}");
        }
        assert!(names.contains(&"rewire-gen-man.1".to_string()), "{names:?}");
        for path in &pages {
            let out = std::process::Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(path)
                .output()
                .expect("groff (groff-base, installed by scripts/setup-test.sh) runs");
            assert!(out.status.success() && out.stderr.is_empty(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            let text = std::process::Command::new("groff").args(["-man", "-Tascii", "-P-cbou"]).arg(path).output().expect("groff runs");
            let text = String::from_utf8_lossy(&text.stdout).into_owned();
            assert!(text.contains("NAME") && text.contains("SYNOPSIS"), "{}:\n{text}", path.display());
        }
        let top = std::process::Command::new("groff").args(["-man", "-Tascii", "-P-cbou"]).arg(dir.join("rewire.1")).output().unwrap();
        let top = String::from_utf8_lossy(&top.stdout).into_owned();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            assert!(top.contains(&format!("rewire-{}(1)", sub.get_name())), "rewire(1) does not list {}:\n{top}", sub.get_name());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The bash completion script is produced, parses, and completes every
    /// command.
    #[test]
    fn bash_completion_is_produced() {
        let mut out = Vec::new();
        completions(clap_complete::Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        let path = std::env::temp_dir().join(format!("rewire-completion-{}.bash", std::process::id()));
        std::fs::write(&path, &script).unwrap();
        // Source it, then ask it to complete `rewire <TAB>` as bash would.
        let probe = format!(
            "source {}; COMP_WORDS=(rewire ''); COMP_CWORD=1; COMP_LINE='rewire '; COMP_POINT=7; _rewire rewire '' rewire; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path.display()
        );
        let out = std::process::Command::new("bash").args(["--norc", "-c", &probe]).output().expect("bash runs");
        std::fs::remove_file(&path).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let words = String::from_utf8_lossy(&out.stdout).into_owned();
        let words: Vec<&str> = words.lines().collect();
        for sub in crate::Cli::command().get_subcommands() {
            assert!(words.contains(&sub.get_name()), "{} not completed: {words:?}", sub.get_name());
        }
    }
}
