//! What adopting, reloading and restoring a daemon's pinned hooks did, as
//! the daemon reports it.

/// What [`Hooks::persistent`] or [`Hooks::reload`] did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// A previous instance's pinned links were found and taken over.
    pub adopted: bool,
    /// The previous programs and tables were the same as this build and
    /// configuration and were kept as they were.
    pub unchanged: bool,
    /// Programs attached with a new link.
    pub attached: Vec<String>,
    /// Programs whose link now runs the new build (`BPF_LINK_UPDATE`).
    pub replaced: Vec<String>,
    /// Links of programs this build no longer has, detached.
    pub detached: Vec<String>,
    /// State maps reused from the pins.
    pub kept_maps: Vec<String>,
    /// State maps whose layout changed: new ones replace them (flows in
    /// progress lose what was in them).
    pub fresh_maps: Vec<String>,
    /// Where the time went (verifier, maps, links).
    pub times: crate::load::LoadTimes,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unchanged {
            return write!(f, "adopted the attached hooks unchanged (same build and configuration)");
        }
        let mut parts = vec![];
        if self.adopted {
            parts.push("adopted the attached hooks".to_string());
        }
        if !self.replaced.is_empty() {
            parts.push(format!("replaced {} program(s) in place (link update)", self.replaced.len()));
        }
        if !self.attached.is_empty() {
            parts.push(format!("attached {} program(s)", self.attached.len()));
        }
        if !self.detached.is_empty() {
            parts.push(format!("detached {} program(s) this build no longer has ({})", self.detached.len(), self.detached.join(", ")));
        }
        if !self.kept_maps.is_empty() {
            parts.push(format!("kept {} state map(s)", self.kept_maps.len()));
        }
        if !self.fresh_maps.is_empty() {
            parts.push(format!(
                "replaced {} state map(s) whose layout changed ({}): flows in progress lose their state",
                self.fresh_maps.len(),
                self.fresh_maps.join(", ")
            ));
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// What [`Hooks::restore_pins`] put back.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Links pinned again (program names).
    pub links: Vec<String>,
    /// Maps pinned again.
    pub maps: Vec<String>,
}

impl Restored {
    /// Nothing was missing.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.maps.is_empty()
    }
}
