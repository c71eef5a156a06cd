//! What a VM's VMM processes used, across every process the VM has had:
//! a VM keeps its totals when its VMM is replaced (a boot after a stop, an
//! emulated reboot), so they never go backwards, and hands out the ended
//! process's cgroup counters once. Each backend holds one.

use crate::backend::BackendError;
use crate::cgroups::CgroupUsage;
use crate::ids::VmId;
use crate::launch::Launched;
use crate::process::{ProcessUsage, UsageReader};

#[derive(Debug, Default)]
pub struct VmmUsage {
    /// Usage of the VM's earlier processes.
    finished: ProcessUsage,
    /// The current process's last reading.
    last: ProcessUsage,
    /// The last ended process's cgroup counters, not yet handed out.
    ended: Option<CgroupUsage>,
    /// The current process's reader, open since its first read.
    reader: Option<UsageReader>,
}

impl VmmUsage {
    /// Reads the current process's CPU time and resident memory. A process
    /// that ended between the caller's check and the read keeps its last reading.
    pub fn read(&mut self, launched: &Launched) -> Result<(), BackendError> {
        let pid = launched.process.pid();
        let read = match self.reader.take().filter(|reader| reader.pid() == pid) {
            Some(reader) => Ok(reader),
            None => UsageReader::open(pid),
        }
        .and_then(|reader| {
            let usage = reader.usage();
            self.reader = Some(reader);
            usage
        });
        match read {
            Ok(usage) => self.last = usage,
            Err(source) if launched.process.exit_status().is_none() => {
                return Err(BackendError::ProcessStats { what: "CPU and memory use", pid, source });
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// Counts an ended process's use into the VM's and undoes its jail,
    /// keeping its cgroup's counters for [`VmmUsage::take_ended`].
    pub async fn retire(&mut self, launched: &mut Launched, vm_id: &VmId) {
        self.finished.cpu_time_ns += self.last.cpu_time_ns;
        self.last = ProcessUsage::default();
        self.reader = None;
        for problem in launched.release().await {
            tracing::error!(%vm_id, problem, "cannot undo the jail of an ended VMM");
        }
        self.ended = launched.ended_usage;
    }

    /// CPU time of every process the VM has had.
    pub fn cpu_time_ns(&self) -> u64 {
        self.finished.cpu_time_ns + self.last.cpu_time_ns
    }

    /// Resident memory of the current process; none when none runs.
    pub fn resident_bytes(&self, running: bool) -> u64 {
        if running { self.last.resident_bytes } else { 0 }
    }

    pub fn take_ended(&mut self) -> Option<CgroupUsage> {
        self.ended.take()
    }
}
