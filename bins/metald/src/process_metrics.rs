//! The standard `process_*` metrics of the metald process itself, read
//! from `/proc/self` at each scrape: what every Prometheus client exports
//! and every dashboard expects.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::metrics::gauge;

/// Encodes what `/proc/self` can tell; a figure it cannot read is left out.
pub fn encode(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let Ok(process) = procfs::process::Process::myself() else { return Ok(()) };
    let ticks = procfs::ticks_per_second() as f64;
    if let Ok(stat) = process.stat() {
        let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(encoder, "process_resident_memory_bytes", "Resident memory size in bytes", stat.rss.saturating_mul(procfs::page_size()))?;
        gauge(encoder, "process_virtual_memory_bytes", "Virtual memory size in bytes", stat.vsize)?;
        gauge(encoder, "process_threads", "Threads of the process", u64::try_from(stat.num_threads).unwrap_or(0))?;
        if let Ok(boot) = procfs::boot_time_secs() {
            let start = ConstGauge::new(boot as f64 + stat.starttime as f64 / ticks);
            start.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                None,
                start.metric_type(),
            )?)?;
        }
    }
    if let Ok(open) = process.fd_count() {
        gauge(encoder, "process_open_fds", "Open file descriptors", open as u64)?;
    }
    if let Ok(limits) = process.limits()
        && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
    {
        gauge(encoder, "process_max_fds", "The most file descriptors the process may open", max)?;
    }
    Ok(())
}
