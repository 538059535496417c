//! A service's identity as the kernel and the records carry it.
//!
//! A service is named in records, chains, events and the kernel's tables
//! by its 1-based position in the configuration (0 means "no service").
//! The position and the id are converted here only, so no caller adds or
//! subtracts one itself (and none can underflow on an id of 0).

use std::fmt;
use std::num::NonZeroU16;

use serde::Serialize;

/// The id of a configured service: its 1-based position in the
/// configuration, never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ServiceId(NonZeroU16);

impl ServiceId {
    /// The first service's id.
    pub const FIRST: ServiceId = ServiceId(NonZeroU16::MIN);

    /// The id as the kernel writes it, if it names a service (not 0).
    pub fn new(raw: u16) -> Option<Self> {
        NonZeroU16::new(raw).map(ServiceId)
    }

    /// The id of the service at `index` (0-based) in the configuration, if
    /// an id can hold it.
    pub fn from_index(index: usize) -> Option<Self> {
        u16::try_from(index).ok()?.checked_add(1).and_then(Self::new)
    }

    /// The ids of the services in configuration order: zip it with the
    /// services (it ends only where ids do).
    pub fn all() -> impl Iterator<Item = ServiceId> {
        (1..=u16::MAX).filter_map(Self::new)
    }

    /// The id as the kernel and the records carry it.
    pub fn get(self) -> u16 {
        self.0.get()
    }

    /// The service's 0-based position in the configuration.
    pub fn index(self) -> usize {
        usize::from(self.0.get() - 1)
    }
}

impl From<ServiceId> for u16 {
    fn from(id: ServiceId) -> u16 {
        id.get()
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::ServiceId;

    #[test]
    fn position_and_id_convert_both_ways_and_zero_is_no_service() {
        assert_eq!(ServiceId::new(0), None);
        assert_eq!(ServiceId::from_index(0), Some(ServiceId::FIRST));
        assert_eq!(ServiceId::FIRST.get(), 1);
        for i in [0usize, 1, 61, 65_534] {
            let id = ServiceId::from_index(i).unwrap();
            assert_eq!((id.index(), usize::from(id.get())), (i, i + 1));
            assert_eq!(ServiceId::new(id.get()), Some(id));
        }
        assert_eq!(ServiceId::from_index(65_535), None);
        assert_eq!(ServiceId::all().take(3).map(ServiceId::get).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(ServiceId::all().count(), 65_535);
    }
}
