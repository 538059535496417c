//! The WFP redirect states, and how a flow's chain determines them.
//!
//! The kernel hook computes the same thing in C (`rw_walk_rule`): a service
//! already in the chain is never chosen again; this module is the reference
//! the tests and the tools use to explain a decision.

use serde::Serialize;

/// Redirect state of one service for one flow (`FWP_CONNECTION_REDIRECT_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u8)]
pub enum RedirectState {
    /// Nobody redirected the flow yet: the service may take it.
    NotRedirected = crate::abi::RW_STATE_NOT_REDIRECTED,
    /// The service is the last one that took the flow: this is its own outbound connection; let it pass.
    RedirectedBySelf = crate::abi::RW_STATE_REDIRECTED_BY_SELF,
    /// Other services took the flow, this one has not: it may take it.
    RedirectedByOther = crate::abi::RW_STATE_REDIRECTED_BY_OTHER,
    /// The service took it earlier and another after it: it must not take it again.
    PreviouslyRedirectedBySelf = crate::abi::RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF,
}

impl RedirectState {
    /// The state of `service` given the flow's chain (first to last).
    pub fn of(chain: &[u16], service: u16) -> Self {
        match chain.iter().position(|&s| s == service) {
            None if chain.is_empty() => RedirectState::NotRedirected,
            None => RedirectState::RedirectedByOther,
            Some(i) if i + 1 == chain.len() => RedirectState::RedirectedBySelf,
            Some(_) => RedirectState::PreviouslyRedirectedBySelf,
        }
    }

    /// Whether the service may redirect the flow in this state.
    pub fn may_redirect(self) -> bool {
        matches!(self, RedirectState::NotRedirected | RedirectState::RedirectedByOther)
    }

    /// Decodes the numeric value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => RedirectState::NotRedirected,
            1 => RedirectState::RedirectedBySelf,
            2 => RedirectState::RedirectedByOther,
            3 => RedirectState::PreviouslyRedirectedBySelf,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RedirectState::*;
    use super::*;

    #[test]
    fn states_follow_the_chain() {
        assert_eq!(RedirectState::of(&[], 1), NotRedirected);
        assert_eq!(RedirectState::of(&[2], 1), RedirectedByOther);
        assert_eq!(RedirectState::of(&[1], 1), RedirectedBySelf);
        assert_eq!(RedirectState::of(&[1, 2], 1), PreviouslyRedirectedBySelf);
        assert_eq!(RedirectState::of(&[1, 2], 2), RedirectedBySelf);
        assert!(NotRedirected.may_redirect() && RedirectedByOther.may_redirect());
        assert!(!RedirectedBySelf.may_redirect() && !PreviouslyRedirectedBySelf.may_redirect());
        for v in 0..4 {
            assert_eq!(RedirectState::from_u8(v).unwrap() as u8, v);
        }
        assert_eq!(RedirectState::from_u8(4), None);
    }
}
