//! Create+boot to the guest's ready line: through the metald library against
//! `firecracker --no-api --config-file` with the same guest, in the same run.
//! Prints both medians and their ratio after criterion's own report.

use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, ms, timed_iterations};

fn create_boot(c: &mut Criterion) {
    let Some(host) = BenchHost::new() else { return };
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (host, library, raw) = (&host, &Recorder::default(), &Recorder::default());

    let mut group = c.benchmark_group("create_boot_to_ready");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    group.bench_function("raw_firecracker_no_api", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(&runtime, iterations, |index| async move {
                let took = host.raw_boot(index).await.unwrap_or_else(|error| panic!("raw boot: {error}"));
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
    println!("\ncreate+boot to ready, same guest, same run:");
    println!("  firecracker --no-api --config-file: median {} over {} boots", ms(raw_median), raw.samples().len());
    println!("  metald library (create, boot, ready): median {} over {} boots", ms(library_median), library.samples().len());
    println!("  ratio metald / raw: {:.2}", library_median.as_secs_f64() / raw_median.as_secs_f64().max(f64::EPSILON));
}

criterion_group!(benches, create_boot);
criterion_main!(benches);
