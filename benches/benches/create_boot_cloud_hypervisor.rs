//! Create+boot to the guest's ready line on Cloud Hypervisor: through the
//! metald library, jailed, against `cloud-hypervisor --kernel … --cmdline …
//! --serial tty --console off` with the same guest, in the same run. Needs
//! `METALD_CLOUD_HYPERVISOR_BIN`; skipped, saying why, without it.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, ms, timed_iterations};

fn create_boot(c: &mut Criterion) {
    let Some((host, binary)) = BenchHost::cloud_hypervisor() else { return };
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (host, binary, library, raw) = (&host, &binary, &Recorder::default(), &Recorder::default());

    let mut group = c.benchmark_group("cloud_hypervisor_create_boot_to_ready");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    group.bench_function("raw_cloud_hypervisor", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(&runtime, iterations, |_| async move {
                let took = host.raw_cloud_hypervisor_boot(binary).await.unwrap_or_else(|error| panic!("raw boot: {error}"));
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
    println!("\nCloud Hypervisor create+boot to ready, same guest, same run:");
    println!("  cloud-hypervisor --kernel --serial tty: median {} over {} boots", ms(raw_median), raw.samples().len());
    println!("  metald library (create, boot, ready; jailed): median {} over {} boots", ms(library_median), library.samples().len());
    println!("  ratio metald / raw: {:.2}", library_median.as_secs_f64() / raw_median.as_secs_f64().max(f64::EPSILON));
}

criterion_group!(benches, create_boot);
criterion_main!(benches);
