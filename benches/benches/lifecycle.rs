//! Lifecycle throughput: VMs per second through create, boot, ready line and
//! delete with four at a time, against raw Firecracker (spawn, ready line,
//! kill) at the same concurrency, in the same run: through the library's
//! default jailer (no pool) and through one with metald's jail pool of 2.
//! Beside each rate it reports the host CPU time one VM cost: with every
//! core busy, that cost, not latency, bounds the rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use metald_benches::{BenchHost, HostCpu, Recorder, ms, ratio, timed_iterations};
use tokio::sync::Semaphore;

const CONCURRENCY: usize = 4;
const VMS_PER_ROUND: usize = 20;
/// metald's `jailer.pool_size` default.
const DAEMON_JAIL_POOL: usize = 2;

/// The rounds of one side of the comparison: how long each took and the
/// host CPU time each cost.
#[derive(Default)]
struct Rounds {
    took: Recorder,
    cpu: Recorder,
}

impl Rounds {
    fn rate(&self) -> f64 {
        VMS_PER_ROUND as f64 / self.took.median().as_secs_f64().max(f64::EPSILON)
    }

    fn cpu_per_vm(&self) -> Duration {
        let rounds = self.cpu.samples();
        rounds.iter().sum::<Duration>().div_f64((rounds.len() * VMS_PER_ROUND).max(1) as f64)
    }
}

/// Runs `VMS_PER_ROUND` of `work`, `CONCURRENCY` at a time, records the
/// round in `rounds` and returns how long it took.
async fn round<F, Fut>(rounds: &Rounds, work: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let cpu = HostCpu::now();
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
    let took = started.elapsed();
    rounds.took.record(took);
    rounds.cpu.record(cpu.map(|cpu| cpu.spent()).unwrap_or_default());
    took
}

fn lifecycle(c: &mut Criterion) {
    let (Some(host), Some(pooled_host)) = (BenchHost::new(), BenchHost::pooled(DAEMON_JAIL_POOL)) else { return };
    let (host, pooled_host) = (Arc::new(host), Arc::new(pooled_host));
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (host, library, raw) = (&host, &Rounds::default(), &Rounds::default());
    let (pooled_host, pooled) = (&pooled_host, &Rounds::default());

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
                round(raw, |index| {
                    let host = Arc::clone(host);
                    async move { host.raw_boot(index as u64).await.map(drop) }
                })
                .await
            })
        })
    });
    let mut library_group = |name: &str, host: &Arc<BenchHost>, rounds: &Rounds| {
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                timed_iterations(&runtime, iterations, |_| async move {
                    round(rounds, |_| {
                        let host = Arc::clone(host);
                        async move { host.library_lifecycle().await }
                    })
                    .await
                })
            })
        });
    };
    library_group("metald_library", host, library);
    library_group("metald_library_jail_pool_2", pooled_host, pooled);
    group.finish();

    let cores = HostCpu::cores();
    println!(
        "\nlifecycle throughput at concurrency {CONCURRENCY}, same run (median of rounds of {VMS_PER_ROUND} VMs; host CPU per VM over all rounds, {cores} cores):"
    );
    let report = |what: &str, rounds: &Rounds| {
        let cpu = rounds.cpu_per_vm();
        let ceiling = cores as f64 / cpu.as_secs_f64().max(f64::EPSILON);
        println!("  {what}: {:.1} VMs/s, host CPU {} per VM (all cores busy: at most {ceiling:.1} VMs/s)", rounds.rate(), ms(cpu));
    };
    let against_raw = |what: &str, rounds: &Rounds| {
        println!(
            "  ratio {what} / raw: {:.2} VMs/s, {:.2} host CPU per VM",
            rounds.rate() / raw.rate().max(f64::EPSILON),
            ratio(rounds.cpu_per_vm(), raw.cpu_per_vm())
        );
    };
    report("firecracker --no-api (spawn, ready line, kill)", raw);
    report("metald library (create, boot, ready line, delete)", library);
    against_raw("metald", library);
    report(&format!("metald library, jail pool of {DAEMON_JAIL_POOL} as metald keeps"), pooled);
    against_raw("metald with the pool", pooled);
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
