//! Per-VM network setup and teardown through the provider, against the
//! bare netlink calls (and TAP ioctl) that make the same datapath, in the
//! same run; then how setup time grows as one host fills up to 1000 VMs.
//! Everything happens inside a network namespace the benchmark makes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{Recorder, median, ms, run_prefix};
use metald_core::config::NetworkInterface;
use metald_core::network::{AttachRequest, NetworkProvider};
use metald_core::{TenantId, VmId};
use metald_net::netlink::Netlink;
use metald_net::netns::{DEFAULT_NETNS_DIR, NetnsDir};
use metald_net::{Ipv6Network, NetworkConfig};

const SAMPLES: usize = 200;
const FILL: usize = 1000;

struct Bench {
    namespaces: NetnsDir,
    prefix: String,
    provider: Arc<Ipv6Network>,
    _state: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(DEFAULT_NETNS_DIR) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    let _ = self.namespaces.delete(&name);
                }
            }
        }
    }
}

fn interfaces() -> Vec<NetworkInterface> {
    vec![NetworkInterface { id: "eth0".into(), ..NetworkInterface::default() }]
}

fn percentile(samples: &[Duration], per_mille: usize) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    // The nearest rank: the ⌈per_mille × n / 1000⌉-th smallest.
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted.get(rank.saturating_sub(1)).copied().unwrap_or_default()
}

async fn setup(bench: &Bench, vm: &str, tenant: &str) -> Duration {
    let vm_id = VmId::new(vm).unwrap_or_else(|error| panic!("{error}"));
    let tenant = TenantId::new(tenant).unwrap_or_else(|error| panic!("{error}"));
    let started = Instant::now();
    bench
        .provider
        .attach(AttachRequest { vm_id: &vm_id, tenant: &tenant, interfaces: &interfaces(), owner: Some((1_300_000, 1_300_000)) })
        .await
        .unwrap_or_else(|error| panic!("attach: {}", metald_core::error_chain(&error)));
    // The firewall loads while the manager starts the VMM; alone, the setup waits for it.
    bench.provider.settle(&vm_id).await.unwrap_or_else(|error| panic!("settle: {}", metald_core::error_chain(&error)));
    started.elapsed()
}

async fn teardown(bench: &Bench, vm: &str) -> Duration {
    let vm_id = VmId::new(vm).unwrap_or_else(|error| panic!("{error}"));
    let started = Instant::now();
    bench.provider.detach(&vm_id).await.unwrap_or_else(|error| panic!("detach: {}", metald_core::error_chain(&error)));
    started.elapsed()
}

/// The same datapath by bare calls: namespace, veth into it, bridge and TAP
/// inside, masters, links up; then the host link and the namespace removed.
async fn bare(namespaces: &NetnsDir, host: &Netlink, name: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let namespace = namespaces.create(name).unwrap_or_else(|error| panic!("{error}"));
    let inside = Netlink::connect(Some(std::os::fd::AsFd::as_fd(&namespace))).unwrap_or_else(|error| panic!("{error}"));
    host.add_veth("bare0", "eth0", &namespace).await.unwrap_or_else(|error| panic!("{error}"));
    inside.add_bridge("br0", 1500).await.unwrap_or_else(|error| panic!("{error}"));
    metald_net::tap::create(&namespace, "tap0", Some((1_300_000, 1_300_000))).unwrap_or_else(|error| panic!("{error}"));
    for link in ["eth0", "tap0"] {
        inside.set_master(link, "br0").await.unwrap_or_else(|error| panic!("{error}"));
    }
    for link in ["br0", "eth0", "tap0"] {
        inside.up(link, 1500).await.unwrap_or_else(|error| panic!("{error}"));
    }
    host.set_master("bare0", "barebr").await.unwrap_or_else(|error| panic!("{error}"));
    host.up("bare0", 1500).await.unwrap_or_else(|error| panic!("{error}"));
    let set_up = started.elapsed();
    let started = Instant::now();
    host.delete("bare0").await.unwrap_or_else(|error| panic!("{error}"));
    namespaces.delete(name).unwrap_or_else(|error| panic!("{error}"));
    (set_up, started.elapsed())
}

fn network(c: &mut Criterion) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("benchmark skipped: it needs root");
        return;
    }
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let Ok(state) = tempfile::Builder::new().prefix("metald-bench-").tempdir() else { return };
    let prefix = run_prefix();
    let namespaces = NetnsDir::new(DEFAULT_NETNS_DIR);
    let host_name = format!("{prefix}host");
    let bench = runtime.block_on(async {
        namespaces.create(&host_name).unwrap_or_else(|error| panic!("{error}"));
        let config = NetworkConfig {
            host_prefix: Some("fd6d:6265:6e63::/48".parse().unwrap_or_default()),
            state_dir: state.path().to_path_buf(),
            host_netns: Some(namespaces.path_of(&host_name)),
            netns_prefix: prefix.clone(),
            ..NetworkConfig::default()
        };
        let provider = Arc::new(Ipv6Network::new(config).await.unwrap_or_else(|error| panic!("{error}")));
        Bench { namespaces: namespaces.clone(), prefix: prefix.clone(), provider, _state: state }
    });
    let host_namespace = namespaces.open(&host_name).unwrap_or_else(|error| panic!("{error}"));
    let host = runtime.block_on(async {
        let host = Netlink::connect(Some(std::os::fd::AsFd::as_fd(&host_namespace))).unwrap_or_else(|error| panic!("{error}"));
        host.add_bridge("barebr", 1500).await.unwrap_or_else(|error| panic!("{error}"));
        host
    });

    // A VM that stays, so the measured VMs join a tenant that exists (the
    // common case); a tenant's first and last VM are measured on their own below.
    runtime.block_on(setup(&bench, "vm-resident", "acme"));
    let (ours_up, ours_down, bare_up, bare_down) = (Recorder::default(), Recorder::default(), Recorder::default(), Recorder::default());
    let mut group = c.benchmark_group("vm_network_setup_and_teardown");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(300));
    group.bench_function("bare_netlink", |bencher| {
        bencher.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for index in 0..iterations {
                    let (up, down) = bare(&namespaces, &host, &format!("{prefix}bare-{index}")).await;
                    bare_up.record(up);
                    bare_down.record(down);
                    total += up + down;
                }
                total
            })
        })
    });
    group.bench_function("metald_provider", |bencher| {
        bencher.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for index in 0..iterations {
                    let vm = format!("vm-{index}");
                    let up = setup(&bench, &vm, "acme").await;
                    let down = teardown(&bench, &vm).await;
                    ours_up.record(up);
                    ours_down.record(down);
                    total += up + down;
                }
                total
            })
        })
    });
    group.finish();
    // At least SAMPLES of each, whatever criterion chose.
    runtime.block_on(async {
        for index in ours_up.samples().len()..SAMPLES {
            let vm = format!("vm-extra-{index}");
            ours_up.record(setup(&bench, &vm, "acme").await);
            ours_down.record(teardown(&bench, &vm).await);
        }
        for index in bare_up.samples().len()..SAMPLES {
            let (up, down) = bare(&namespaces, &host, &format!("{prefix}bare-extra-{index}")).await;
            bare_up.record(up);
            bare_down.record(down);
        }
    });
    let report = |label: &str, recorder: &Recorder| {
        let samples = recorder.samples();
        println!("  {label:<28} median {:>9}  p99 {:>9}  (n={})", ms(median(&samples)), ms(percentile(&samples, 990)), samples.len());
    };
    println!("\nper-VM network, same run:");
    report("setup, bare netlink", &bare_up);
    report("setup, metald provider", &ours_up);
    report("teardown, bare netlink", &bare_down);
    report("teardown, metald provider", &ours_down);
    println!(
        "  ratio metald / bare: setup {:.2}, teardown {:.2}",
        ours_up.median().as_secs_f64() / bare_up.median().as_secs_f64().max(f64::EPSILON),
        ours_down.median().as_secs_f64() / bare_down.median().as_secs_f64().max(f64::EPSILON)
    );
    let (first_up, last_down) = (Recorder::default(), Recorder::default());
    runtime.block_on(async {
        for index in 0..20 {
            let (vm, tenant) = (format!("vm-lone-{index}"), format!("lone-{index}"));
            first_up.record(setup(&bench, &vm, &tenant).await);
            last_down.record(teardown(&bench, &vm).await);
        }
    });
    report("setup, a tenant's first VM", &first_up);
    report("teardown, a tenant's last VM", &last_down);

    // Filling one host: 1000 VMs over 10 tenants, never torn down in between.
    let fill: Vec<Duration> = runtime.block_on(async {
        let mut durations = Vec::with_capacity(FILL);
        for index in 0..FILL {
            durations.push(setup(&bench, &format!("vm-fill-{index}"), &format!("tenant-{}", index % 10)).await);
        }
        durations
    });
    let window = |range: std::ops::Range<usize>| median(&fill[range]);
    println!("\nsetup time as the host fills (median of 10 around each point):");
    for point in [1usize, 10, 100, 500, 1000] {
        let start = point.saturating_sub(10);
        println!("  VM {point:>4}: {}", ms(window(start..point)));
    }
    println!(
        "  ratio 1000th / 1st (medians of the last and first 10): {:.2}",
        window(990..1000).as_secs_f64() / window(0..10).as_secs_f64().max(f64::EPSILON)
    );
    let drained = runtime.block_on(async {
        let started = Instant::now();
        for index in 0..FILL {
            teardown(&bench, &format!("vm-fill-{index}")).await;
        }
        started.elapsed()
    });
    println!("  tearing all {FILL} down took {} ({} each)", ms(drained), ms(drained.div_f64(FILL as f64)));
}

criterion_group!(benches, network);
criterion_main!(benches);
