//! Lifecycle throughput: VMs per second through create, boot, ready line and
//! delete with four at a time, against raw Firecracker (spawn, ready line,
//! kill) at the same concurrency, in the same run: through the library's
//! default jailer (no pool) and through one with metald's jail pool of 2.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, timed_iterations};
use tokio::sync::Semaphore;

const CONCURRENCY: usize = 4;
const VMS_PER_ROUND: usize = 20;
/// metald's `jailer.pool_size` default.
const DAEMON_JAIL_POOL: usize = 2;

async fn round<F, Fut>(work: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(VMS_PER_ROUND);
    for index in 0..VMS_PER_ROUND {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { break };
        let job = work(index);
        tasks.push(tokio::spawn(async move {
            let result = job.await;
            drop(permit);
            result
        }));
    }
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => panic!("lifecycle failed: {error}"),
            Err(error) => panic!("lifecycle task failed: {error}"),
        }
    }
    started.elapsed()
}

fn lifecycle(c: &mut Criterion) {
    let (Some(host), Some(pooled_host)) = (BenchHost::new(), BenchHost::pooled(DAEMON_JAIL_POOL)) else { return };
    let (host, pooled_host) = (Arc::new(host), Arc::new(pooled_host));
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (host, library, raw) = (&host, &Recorder::default(), &Recorder::default());
    let (pooled_host, pooled) = (&pooled_host, &Recorder::default());

    let mut group = c.benchmark_group("lifecycle_concurrency_4");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(VMS_PER_ROUND as u64));
    group.bench_function("raw_firecracker_no_api", |bencher| {
        bencher.iter_custom(|iterations| {
            timed_iterations(&runtime, iterations, |_| async move {
                let took = round(|index| {
                    let host = Arc::clone(host);
                    async move { host.raw_boot(index as u64).await.map(drop) }
                })
                .await;
                raw.record(took);
                took
            })
        })
    });
    let mut library_group = |name: &str, host: &Arc<BenchHost>, recorder: &Recorder| {
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                timed_iterations(&runtime, iterations, |_| async move {
                    let took = round(|_| {
                        let host = Arc::clone(host);
                        async move { host.library_lifecycle().await }
                    })
                    .await;
                    recorder.record(took);
                    took
                })
            })
        });
    };
    library_group("metald_library", host, library);
    library_group("metald_library_jail_pool_2", pooled_host, pooled);
    group.finish();

    let rate = |recorder: &Recorder| VMS_PER_ROUND as f64 / recorder.median().as_secs_f64().max(f64::EPSILON);
    let (raw, library, pooled) = (rate(raw), rate(library), rate(pooled));
    println!("\nlifecycle throughput at concurrency {CONCURRENCY}, same run (median of rounds of {VMS_PER_ROUND} VMs):");
    println!("  firecracker --no-api (spawn, ready line, kill): {raw:.1} VMs/s");
    println!("  metald library (create, boot, ready line, delete): {library:.1} VMs/s");
    println!("  ratio metald / raw: {:.2}", library / raw.max(f64::EPSILON));
    println!("  metald library, jail pool of {DAEMON_JAIL_POOL} as metald keeps: {pooled:.1} VMs/s");
    println!("  ratio metald with the pool / raw: {:.2}", pooled / raw.max(f64::EPSILON));
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
