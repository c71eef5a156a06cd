//! Block counters come from the VMM itself (a metrics flush over its API),
//! and a VMM can be slow to answer or not answer at all: stopped by a
//! signal, or busy behind an operation that holds its VM. This module reads
//! them beside the meter, never in its way: the meter asks for a reading
//! and takes the newest one that has arrived, so one VM's VMM can delay
//! only its own block figures, never a tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use metald_core::{DeviceCounters, VmId, VmManager};

/// Where block counters come from (the VMM's own accounting).
#[async_trait]
pub trait BlockSource: Send + Sync + std::fmt::Debug {
    /// Cumulative block I/O of a VM's VMM over its life.
    async fn block_totals(&self, vm_id: &VmId) -> Option<DeviceCounters>;
}

#[async_trait]
impl BlockSource for VmManager {
    async fn block_totals(&self, vm_id: &VmId) -> Option<DeviceCounters> {
        self.run(vm_id, metald_core::operations::Metrics).await.ok().map(|metrics| metrics.devices)
    }
}

/// The newest reading of one VM, and whether a read is under way.
#[derive(Debug, Default)]
struct Reading {
    /// The VMM the totals belong to: a reading of an earlier VMM of the
    /// same VM is never handed out for a later one.
    pid: Option<u32>,
    totals: Option<DeviceCounters>,
    in_flight: bool,
}

/// Block reads on the runtime, at most one under way per VM.
#[derive(Debug, Default)]
pub(crate) struct BlockReads {
    source: Option<(Arc<dyn BlockSource>, tokio::runtime::Handle)>,
    readings: Arc<Mutex<HashMap<VmId, Reading>>>,
}

impl BlockReads {
    pub(crate) fn new(source: Option<Arc<dyn BlockSource>>, runtime: Option<tokio::runtime::Handle>) -> Self {
        Self { source: source.zip(runtime), readings: Arc::default() }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.source.is_some()
    }

    /// Starts a read of the VM's totals unless one is still under way.
    pub(crate) fn request(&self, vm_id: &VmId, pid: Option<u32>) {
        let Some((source, runtime)) = &self.source else { return };
        {
            let mut readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
            let reading = readings.entry(vm_id.clone()).or_default();
            if reading.in_flight {
                return;
            }
            reading.in_flight = true;
        }
        let (source, readings, vm_id) = (Arc::clone(source), Arc::clone(&self.readings), vm_id.clone());
        runtime.spawn(async move {
            let totals = source.block_totals(&vm_id).await;
            let mut readings = readings.lock().unwrap_or_else(PoisonError::into_inner);
            // A VM forgotten while its read was under way stays forgotten.
            if let Some(reading) = readings.get_mut(&vm_id) {
                reading.in_flight = false;
                if totals.is_some() {
                    *reading = Reading { pid, totals, in_flight: false };
                }
            }
        });
    }

    /// The newest totals that arrived for this VMM of the VM.
    pub(crate) fn latest(&self, vm_id: &VmId, pid: Option<u32>) -> Option<DeviceCounters> {
        let readings = self.readings.lock().unwrap_or_else(PoisonError::into_inner);
        readings.get(vm_id).filter(|reading| reading.pid == pid).and_then(|reading| reading.totals)
    }

    pub(crate) fn forget(&self, vm_id: &VmId) {
        self.readings.lock().unwrap_or_else(PoisonError::into_inner).remove(vm_id);
    }
}
