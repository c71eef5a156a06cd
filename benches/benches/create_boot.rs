//! Create+boot to the guest's ready line through the metald library,
//! jailed, against the raw VMM with the same guest, in the same run:
//! Firecracker (`firecracker --no-api --config-file`) and, when
//! `METALD_CLOUD_HYPERVISOR_BIN` names one, Cloud Hypervisor
//! (`cloud-hypervisor --kernel … --cmdline … --serial tty --console off`).
//! Prints each pair's medians and their ratio after criterion's own report.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, ms, timed_iterations};

/// One VMM's comparison: `raw` boots the VMM by hand once (its index given).
async fn raw_then<F, Fut>(raw: &F, index: u64) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    raw(index).await.unwrap_or_else(|error| panic!("raw boot: {error}"))
}

fn compare<F, Fut>(c: &mut Criterion, host: &BenchHost, group_name: &str, raw_label: &str, raw_boot: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (library, raw) = (&Recorder::default(), &Recorder::default());
    let raw_boot = &raw_boot;
    let mut group = c.benchmark_group(group_name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    group.bench_function("raw", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(&runtime, iterations, |index| async move {
                let took = raw_then(raw_boot, index).await;
                raw.record(took);
                took
            })
        })
    });
    group.bench_function("metald_library", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(&runtime, iterations, |_| async move {
                let (took, vm_id) = host.library_boot().await.unwrap_or_else(|error| panic!("library boot: {error}"));
                host.library_delete(&vm_id).await.unwrap_or_else(|error| panic!("delete: {error}"));
                library.record(took);
                took
            })
        })
    });
    group.finish();

    let (library_median, raw_median) = (library.median(), raw.median());
    println!("\n{group_name}, same guest, same run:");
    println!("  {raw_label}: median {} over {} boots", ms(raw_median), raw.samples().len());
    println!("  metald library (create, boot, ready; jailed): median {} over {} boots", ms(library_median), library.samples().len());
    println!("  ratio metald / raw: {:.2}", library_median.as_secs_f64() / raw_median.as_secs_f64().max(f64::EPSILON));
}

fn create_boot(c: &mut Criterion) {
    if let Some(host) = BenchHost::new() {
        let host = &host;
        compare(c, host, "create_boot_to_ready", "firecracker --no-api --config-file", |index| host.raw_boot(index));
    }
    if let Some((host, binary)) = BenchHost::cloud_hypervisor() {
        let (host, binary) = (&host, &binary);
        compare(c, host, "cloud_hypervisor_create_boot_to_ready", "cloud-hypervisor --kernel --serial tty --console off", |_| {
            host.raw_cloud_hypervisor_boot(binary)
        });
    }
}

criterion_group!(benches, create_boot);
criterion_main!(benches);
