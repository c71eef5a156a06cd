//! Create+boot to the guest's ready line through the metald library,
//! jailed, against the raw VMM with the same guest, in the same run:
//! Firecracker (`firecracker --no-api --config-file`) and, when
//! `METALD_CLOUD_HYPERVISOR_BIN` names one, Cloud Hypervisor
//! (`cloud-hypervisor --kernel … --cmdline … --serial tty --console off`).
//! Prints each pair's medians and their ratio after criterion's own report.
//! Firecracker is also measured through a jailer with a pool of 2 ready
//! jail children, warm (refilled before each create) and drained (two
//! untimed creates, not booted, take both parts just before the timed one), with the
//! median of each of the jail's steps.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, ms, timed_iterations};

/// One VMM's comparison: `raw` boots the VMM by hand once (its index given).
async fn raw_then<F, Fut>(raw: &F, index: u64) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    raw(index).await.unwrap_or_else(|error| panic!("raw boot: {error}"))
}

/// A group of create+boot measurements, sampled alike.
fn boot_group<'c>(c: &'c mut Criterion, name: &str) -> BenchmarkGroup<'c, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    group
}

/// The raw VMM's boots in `group`, each recorded.
fn bench_raw<F, Fut>(group: &mut BenchmarkGroup<'_, WallTime>, runtime: &tokio::runtime::Runtime, raw_boot: &F, raw: &Recorder)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    group.bench_function("raw", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(runtime, iterations, |index| async move {
                let took = raw_then(raw_boot, index).await;
                raw.record(took);
                took
            })
        })
    });
}

fn compare<F, Fut>(c: &mut Criterion, host: &BenchHost, group_name: &str, raw_label: &str, raw_boot: F)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (library, raw) = (&Recorder::default(), &Recorder::default());
    let mut group = boot_group(c, group_name);
    bench_raw(&mut group, &runtime, &raw_boot, raw);
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

/// Which part of a jail pool a timed create finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// Refilled before each create.
    Warm,
    /// Emptied by an untimed create just before each timed one, so the
    /// timed one makes its child itself while the refill makes another.
    Drained,
}

/// The same create+boot through a jailer with a pool, warm and drained,
/// against raw Firecracker in the same run, with the jail's steps.
fn pooled(c: &mut Criterion, raw_host: &BenchHost) {
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let Some(pooled) = BenchHost::pooled(2) else { return };
    let (pooled, raw) = (&pooled, &Recorder::default());
    let recorders = [(Pool::Warm, Recorder::default()), (Pool::Drained, Recorder::default())];
    let steps: &Mutex<BTreeMap<(&'static str, &'static str), Vec<Duration>>> = &Mutex::new(BTreeMap::new());
    let mut group = boot_group(c, "create_boot_to_ready_pooled");
    bench_raw(&mut group, &runtime, &|index| raw_host.raw_boot(index), raw);
    for (pool, recorder) in &recorders {
        let label = match pool {
            Pool::Warm => "warm",
            Pool::Drained => "drained",
        };
        group.bench_function(format!("metald_library_{label}_pool"), |bencher| {
            bencher.iter_custom(|iterations| {
                timed_iterations(&runtime, iterations, |_| async move {
                    pooled.pool_refilled().await;
                    let mut taken = Vec::new();
                    if *pool == Pool::Drained {
                        for _ in 0..2 {
                            taken.push(pooled.library_create().await.unwrap_or_else(|error| panic!("draining create: {error}")));
                        }
                    }
                    let (took, vm_id) = pooled.library_boot().await.unwrap_or_else(|error| panic!("{label} boot: {error}"));
                    let timings = pooled.launch_timings(&vm_id).await;
                    if let Ok(mut steps) = steps.lock() {
                        for (step, duration) in timings {
                            steps.entry((label, step)).or_default().push(duration);
                        }
                    }
                    taken.push(vm_id);
                    for vm_id in &taken {
                        pooled.library_delete(vm_id).await.unwrap_or_else(|error| panic!("delete: {error}"));
                    }
                    recorder.record(took);
                    took
                })
            })
        });
    }
    group.finish();
    println!("\ncreate+boot to ready with a jail pool of 2, same guest, same run:");
    println!("  firecracker --no-api --config-file: median {}", ms(raw.median()));
    for (pool, recorder) in &recorders {
        println!(
            "  metald library, {pool:?} pool: median {} over {} boots, ratio to raw {:.2}",
            ms(recorder.median()),
            recorder.samples().len(),
            recorder.median().as_secs_f64() / raw.median().as_secs_f64().max(f64::EPSILON)
        );
    }
    println!("where a pooled launch spends its time (median per step):");
    if let Ok(steps) = steps.lock() {
        for ((label, step), durations) in steps.iter() {
            println!("  {label:<8} {step:<26} {} ({} launches)", ms(metald_benches::median(durations)), durations.len());
        }
    }
}

fn create_boot(c: &mut Criterion) {
    if let Some(host) = BenchHost::new() {
        let host = &host;
        compare(c, host, "create_boot_to_ready", "firecracker --no-api --config-file", |index| host.raw_boot(index));
        pooled(c, host);
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
