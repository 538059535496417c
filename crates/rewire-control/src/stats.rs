//! What the kernel counts per service, and the live generation: read from
//! the maps and links pinned under a daemon's pin directory, so `rewire
//! status` and the daemon's `/metrics` answer from the kernel's own state
//! (also when no daemon runs), never from a copy kept in user space.
//!
//! The per-service counters (`rw_svc_counters`, a per-CPU array indexed by
//! `service_id * RW_CNT_N + cause`) count the same causes as the global
//! `rw_counters` wherever the hook knows the service the decision is about;
//! id 0 holds nothing (causes that name no service are only counted
//! globally).

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use rewire::abi;

use crate::hooks::{Counters, HooksError};

/// The pinned per-service counters of one daemon.
pub struct ServiceCountersReader(PerCpuArray<MapData, u64>);

impl std::fmt::Debug for ServiceCountersReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceCountersReader")
    }
}

impl ServiceCountersReader {
    /// Opens the `rw_svc_counters` pinned under a daemon's pin directory.
    pub fn open_pinned(dir: &Path) -> Result<Self, HooksError> {
        let err = |source| HooksError::Map { name: "rw_svc_counters", source };
        let map = MapData::from_pin(dir.join("rw_svc_counters")).map_err(err)?;
        Ok(Self(PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(err)?))
    }

    /// The counters of service `id` (1 to [`abi::RW_MAX_SERVICES`]), summed over CPUs.
    pub fn read(&self, id: u16) -> Result<Counters, HooksError> {
        let n = abi::RW_CNT_N;
        let mut slots = vec![0u64; n as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            let key = u32::from(id) * n + i as u32;
            let per_cpu = self.0.get(&key, 0).map_err(|source| HooksError::Map { name: "rw_svc_counters", source })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(Counters::from_slots(&slots))
    }
}

/// The live generation: the id of the newest program the pinned links run
/// (program ids only grow, and every reload loads new programs), or `None`
/// when no link is pinned.
pub fn generation(dir: &Path) -> Option<u32> {
    crate::persist::link_status(dir).ok()?.values().map(|l| l.prog_id).max()
}
