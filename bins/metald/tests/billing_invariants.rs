//! Billing's invariants over random operations, through the real daemon
//! into a real ClickHouse: several VMs are driven through random sequences
//! of create, boot, pause, resume, reboot, graceful and forced shutdown,
//! delete in any state, a VMM killed, and metald SIGKILLed or SIGTERMed and
//! started again (sometimes with a VMM killed while it was away). After
//! each run, per VM and per VMM life: intervals contiguous, one final
//! record at each stop (or, for a VMM that ended while metald was away, a
//! gap from its last record on), no interval charged more CPU than its
//! vCPUs could use, a gap only where metald really was away, every row
//! once in ClickHouse and the rollups equal to the raw rows.
//!
//! CI runs a fixed budget (seeds 1, 2 and 3, 40 steps each);
//! `METALD_MODEL_SEEDS` (comma-separated) and `METALD_MODEL_STEPS` replace
//! it for longer runs by hand. Every run prints its seed for replay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{CgroupCounter, Client, Host, HostOptions, Wire, create_request, guest_config, state_of};
use metald_api::proto::vmprovisioner::v1 as wire;
use metald_api::proto::vmprovisioner::v1::VmState;
use metald_billing::clickhouse::{ClickHouseSink, USAGE_TABLE};
use metald_testguest::clickhouse::require_clickhouse;
use metald_testguest::{cmdline, wait_until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DATABASE: &str = "metald";
const VM_SLOTS: usize = 3;
/// What a record may charge beyond its vCPUs × its length: a VMM's first
/// record also carries its own start-up, which its cgroup counted before the boot.
const SLACK_NS: u64 = 500_000_000;
const CI_SEEDS: [u64; 3] = [1, 2, 3];
const CI_STEPS: usize = 40;

fn budget() -> (Vec<u64>, usize) {
    let seeds = std::env::var("METALD_MODEL_SEEDS")
        .ok()
        .map(|seeds| seeds.split(',').map(|seed| seed.trim().parse().expect("a seed")).collect())
        .unwrap_or_else(|| CI_SEEDS.to_vec());
    let steps = std::env::var("METALD_MODEL_STEPS").ok().map(|steps| steps.parse().expect("a step count")).unwrap_or(CI_STEPS);
    (seeds, steps)
}

#[derive(Debug, Clone, Copy)]
enum Operation {
    Create,
    Boot,
    Pause,
    Resume,
    Reboot { force: bool },
    Shutdown { force: bool },
    Delete { force: bool },
    KillVmm,
    RestartAfterSigkill { kill_a_vmm_meanwhile: bool },
    RestartAfterSigterm,
}

fn pick(rng: &mut StdRng) -> Operation {
    match rng.random_range(0..20) {
        0..=3 => Operation::Create,
        4..=7 => Operation::Boot,
        8..=9 => Operation::Pause,
        10..=11 => Operation::Resume,
        12..=13 => Operation::Reboot { force: rng.random_bool(0.5) },
        14..=15 => Operation::Shutdown { force: rng.random_bool(0.5) },
        16 => Operation::Delete { force: rng.random_bool(0.5) },
        17 => Operation::KillVmm,
        18 => Operation::RestartAfterSigkill { kill_a_vmm_meanwhile: rng.random_bool(0.5) },
        _ => Operation::RestartAfterSigterm,
    }
}

/// What the run did that the invariants depend on.
#[derive(Debug, Default)]
struct Journal {
    vms: BTreeSet<String>,
    /// When metald was away after a SIGKILL: from the kill until the next start was ready.
    away: Vec<(u64, u64)>,
    /// Per VM, how many VMMs booted: each boot or reboot that succeeded.
    booted_vmms: BTreeMap<String, usize>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL);
}

/// Whether an error is one a random operation may rightly get: the VM is in
/// the wrong state for it, or a create found the tenant's quota full.
fn acceptable(error: &connectrpc::ConnectError) -> bool {
    use connectrpc::ErrorCode;
    matches!(error.code, ErrorCode::FailedPrecondition | ErrorCode::NotFound | ErrorCode::ResourceExhausted)
}

async fn live_vms(client: &Client, journal: &Journal) -> Vec<String> {
    let mut live = Vec::new();
    for vm_id in &journal.vms {
        // A deleted VM is not found.
        if client.get_vm_info(wire::GetVmInfoRequest { vm_id: vm_id.clone(), ..Default::default() }).await.is_ok() {
            live.push(vm_id.clone());
        }
    }
    live
}

async fn step(host: &mut Host, rng: &mut StdRng, journal: &mut Journal, operation: Operation) {
    let client = host.client("acme", Wire::ConnectProto);
    let live = live_vms(&client, journal).await;
    let target = (!live.is_empty()).then(|| live[rng.random_range(0..live.len())].clone());
    // With no VM left, anything but a create would do nothing.
    let operation = if live.is_empty() { Operation::Create } else { operation };
    eprintln!("{operation:?} on {target:?}");
    let result = match (operation, target) {
        (Operation::Create, _) if live.len() < VM_SLOTS => {
            let tokens = if rng.random_bool(0.5) { vec![cmdline::burn_forever()] } else { vec![cmdline::heartbeat_ms(50)] };
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            client.create_vm(create_request(guest_config(&tokens))).await.map(|created| {
                journal.vms.insert(created.into_owned().vm_id);
            })
        }
        (Operation::Boot, Some(vm_id)) => {
            client.boot_vm(wire::BootVmRequest { vm_id: vm_id.clone(), ..Default::default() }).await.map(|_| {
                *journal.booted_vmms.entry(vm_id).or_default() += 1;
            })
        }
        (Operation::Pause, Some(vm_id)) => client.pause_vm(wire::PauseVmRequest { vm_id, ..Default::default() }).await.map(drop),
        (Operation::Resume, Some(vm_id)) => client.resume_vm(wire::ResumeVmRequest { vm_id, ..Default::default() }).await.map(drop),
        (Operation::Reboot { force }, Some(vm_id)) => {
            client.reboot_vm(wire::RebootVmRequest { vm_id: vm_id.clone(), force, ..Default::default() }).await.map(|_| {
                *journal.booted_vmms.entry(vm_id).or_default() += 1;
            })
        }
        (Operation::Shutdown { force }, Some(vm_id)) => {
            client.shutdown_vm(wire::ShutdownVmRequest { vm_id, force, timeout_seconds: 10, ..Default::default() }).await.map(drop)
        }
        (Operation::Delete { force }, Some(vm_id)) => {
            client.delete_vm(wire::DeleteVmRequest { vm_id, force, ..Default::default() }).await.map(drop)
        }
        (Operation::KillVmm, Some(vm_id)) => {
            if let Some(pid) = common::vmm_pid(&vm_id) {
                sigkill(pid);
                // The daemon notices at once; wait for that fact before the next step.
                let (watching, vm_id) = (&client, &vm_id);
                wait_until("the killed VMM's VM to fail", Duration::from_secs(20), || async move {
                    state_of(watching, vm_id).await == VmState::VM_STATE_FAILED
                })
                .await;
            }
            Ok(())
        }
        (Operation::RestartAfterSigkill { kill_a_vmm_meanwhile }, target) => {
            let doomed = match (kill_a_vmm_meanwhile, target) {
                (true, Some(vm_id)) => common::vmm_pid(&vm_id).map(|pid| (vm_id, pid)),
                _ => None,
            };
            let killed_ms = metald_types::time::unix_millis_now();
            host.kill();
            if let Some((_, pid)) = doomed {
                sigkill(pid);
            }
            host.launch();
            journal.away.push((killed_ms, metald_types::time::unix_millis_now()));
            Ok(())
        }
        (Operation::RestartAfterSigterm, _) => {
            let status = host.terminate();
            assert!(status.success(), "metald ended with {status} on SIGTERM; log:\n{}", host.log());
            host.launch();
            Ok(())
        }
        _ => Ok(()),
    };
    match result {
        Ok(()) => eprintln!("  done"),
        Err(error) => {
            eprintln!("  refused: {error}");
            assert!(acceptable(&error), "{operation:?} failed unexpectedly: {error}; log:\n{}", host.log());
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize, clickhouse::Row)]
struct Row {
    vm_id: String,
    sequence: u64,
    start_ms: u64,
    end_ms: u64,
    cpu_ns: u64,
    vcpus: u32,
    paused: u8,
    final_record: u8,
}

#[derive(Debug, Clone, serde::Deserialize, clickhouse::Row)]
struct Gap {
    vm_id: String,
    from_ms: u64,
    to_ms: u64,
}

/// Every run's log lines that name `vm_id`, for a failure's message.
fn log_lines_of(dir: &std::path::Path, vm_id: &str) -> String {
    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    logs.sort();
    logs.iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|line| line.contains(vm_id) && !line.contains("GetVmInfo"))
                .map(|line| format!("{}: {line}\n", path.display()))
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn check_invariants(sink: &ClickHouseSink, journal: &Journal, seed: u64, dir: &std::path::Path, counted: (u64, CgroupCounter)) {
    let client = sink.client();
    let rows: Vec<Row> = client
        .query(&format!(
            "SELECT vm_id, sequence, start_ms, end_ms, cpu_ns, vcpus, paused, final_record FROM {DATABASE}.{USAGE_TABLE} ORDER BY vm_id, sequence"
        ))
        .fetch_all()
        .await
        .unwrap();
    let gaps: Vec<Gap> = client.query(&format!("SELECT vm_id, from_ms, to_ms FROM {DATABASE}.usage_gaps FINAL")).fetch_all().await.unwrap();
    let (count, identities) = client
        .query(&format!("SELECT count(), uniqExact(tenant_id, vm_id, sequence) FROM {DATABASE}.{USAGE_TABLE}"))
        .fetch_one::<(u64, u64)>()
        .await
        .unwrap();
    assert_eq!(count, identities, "seed {seed}: a row is in ClickHouse twice");
    for table in ["usage_hourly_vm", "usage_daily_vm", "usage_hourly_tenant", "usage_daily_tenant"] {
        let intervals: u64 = client.query(&format!("SELECT sum(intervals) FROM {DATABASE}.{table}")).fetch_one().await.unwrap();
        if intervals != count {
            let raw: Vec<(String, u64, u64)> = client
                .query(&format!(
                    "SELECT vm_id, sequence, count() FROM {DATABASE}.{USAGE_TABLE} GROUP BY vm_id, sequence ORDER BY vm_id, sequence"
                ))
                .fetch_all()
                .await
                .unwrap();
            let rolled: Vec<(String, u64)> =
                client.query(&format!("SELECT vm_id, sum(intervals) FROM {DATABASE}.{table} GROUP BY vm_id")).fetch_all().await.unwrap();
            panic!("seed {seed}: {table} counts {intervals} intervals, the raw table {count}: raw {raw:?}, rolled up {rolled:?}");
        }
    }

    if rows.is_empty() {
        // Every daemon of the run was killed or stopped before its meter's first tick saw a
        // booted VM; such a VM is not billed at all (see billing.md, "what is not yet exact").
        eprintln!("seed {seed}: no usage rows at all (gaps {gaps:?})");
    }
    let mut by_vm: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in &rows {
        by_vm.entry(&row.vm_id).or_default().push(row);
    }
    for gap in &gaps {
        // A VMM that ended, or a stop not yet accounted for, while metald was away.
        let metald_away = journal.away.iter().any(|(from, to)| gap.from_ms <= *to && gap.to_ms >= *from);
        assert!(metald_away, "seed {seed}: a gap while metald ran: {gap:?} (away: {:?})\n{}", journal.away, log_lines_of(dir, &gap.vm_id));
    }
    for (vm_id, rows) in &by_vm {
        assert!(journal.vms.contains(*vm_id), "seed {seed}: rows of a VM this run never made: {vm_id}");
        for (index, row) in rows.iter().enumerate() {
            assert_eq!(row.sequence, index as u64 + 1, "seed {seed}: {vm_id}'s sequences are not 1..=n");
            let most_ns = u64::from(row.vcpus) * (row.end_ms - row.start_ms) * 1_000_000 + SLACK_NS;
            assert!(row.cpu_ns <= most_ns, "seed {seed}: {vm_id} charged {} ns in {} ms: {row:?}", row.cpu_ns, row.end_ms - row.start_ms);
        }
        let vm_gaps: Vec<&Gap> = gaps.iter().filter(|gap| gap.vm_id == *vm_id).collect();
        // A VMM life ends at a stop with its final record, or, when it ended while metald was
        // away, with a gap from its last record on.
        let ends_a_life = |row: &&Row| row.final_record == 1 || vm_gaps.iter().any(|gap| gap.from_ms == row.end_ms);
        for life in rows.split_inclusive(ends_a_life) {
            for pair in life.windows(2) {
                assert_eq!(
                    pair[1].start_ms,
                    pair[0].end_ms,
                    "seed {seed}: {vm_id}: a gap or overlap before sequence {}: {rows:?}, gaps {vm_gaps:?}\n{}",
                    pair[1].sequence,
                    log_lines_of(dir, vm_id)
                );
            }
        }
        // Every VM was deleted at the end: its last life ended too.
        let last = rows.last().unwrap();
        assert!(
            ends_a_life(last),
            "seed {seed}: {vm_id}'s last VMM life has neither a final record nor a gap: {rows:?}, gaps {vm_gaps:?}\n{}",
            log_lines_of(dir, vm_id)
        );
    }
    check_cpu(&rows, &gaps, journal, seed, dir, counted);
}

/// One VMM life in the usage: its records (none for a VMM that died
/// before any tick saw it) and how it ended.
#[derive(Debug)]
struct Life<'a> {
    rows: Vec<&'a Row>,
    start_ms: u64,
    /// Its final record's end, or when metald found the VMM gone.
    end_ms: u64,
    ended_in_gap: bool,
}

/// A VM's lives in order: records split at each final record or at a gap
/// that begins where a record ends, and gaps that begin where no record
/// ends (a VMM no tick saw before it died while metald was away).
fn lives_of<'a>(rows: &[&'a Row], gaps: &[&Gap]) -> Vec<Life<'a>> {
    let gap_after = |row: &Row| gaps.iter().find(|gap| row.final_record == 0 && gap.from_ms == row.end_ms).copied();
    let mut lives: Vec<Life<'a>> = rows
        .split_inclusive(|row| row.final_record == 1 || gap_after(row).is_some())
        .map(|life| {
            let last = life[life.len() - 1];
            let gap = gap_after(last);
            Life {
                rows: life.to_vec(),
                start_ms: life[0].start_ms,
                end_ms: gap.map_or(last.end_ms, |gap| gap.to_ms),
                ended_in_gap: gap.is_some(),
            }
        })
        .collect();
    for gap in gaps.iter().filter(|gap| !rows.iter().any(|row| row.final_record == 0 && row.end_ms == gap.from_ms)) {
        lives.push(Life { rows: Vec::new(), start_ms: gap.from_ms, end_ms: gap.to_ms, ended_in_gap: true });
    }
    lives.sort_by_key(|life| life.start_ms);
    lives
}

/// The CPU charged against what each VMM's cgroup counted in all. A life
/// metered to its end and never paused is charged exactly its cgroup's
/// count; a paused one less (paused time charges no CPU, though the VMM
/// may use a little), and one that ended in a gap no more than its count.
/// A VMM that never booted (a VM deleted or failed while Created) has a
/// cgroup and no usage. The kernel's count for the whole cgroup parent
/// holds every VMM of the run, removed ones included: nothing is charged
/// beyond it.
fn check_cpu(rows: &[Row], gaps: &[Gap], journal: &Journal, seed: u64, dir: &std::path::Path, (counted_ns, counter): (u64, CgroupCounter)) {
    let totals = common::cgroups::removed_cgroups(dir);
    let mut vm_ids: BTreeSet<&str> = rows.iter().map(|row| row.vm_id.as_str()).collect();
    vm_ids.extend(gaps.iter().map(|gap| gap.vm_id.as_str()));
    vm_ids.extend(journal.booted_vmms.keys().map(String::as_str));
    let (mut exact, mut bounded) = (0, 0);
    for vm_id in vm_ids {
        let vm_rows: Vec<&Row> = rows.iter().filter(|row| row.vm_id == vm_id).collect();
        let vm_gaps: Vec<&Gap> = gaps.iter().filter(|gap| gap.vm_id == vm_id).collect();
        let lives = lives_of(&vm_rows, &vm_gaps);
        let cgroups = totals.get(vm_id).cloned().unwrap_or_default();
        let context = || format!("lives {lives:?}, cgroups {cgroups:?}\n{}", log_lines_of(dir, vm_id));
        // A life's VMMs (more than one where it was rebooted) went while it lasted; a cgroup
        // that went outside every life belonged to a VMM that never booted (the one a create
        // makes, replaced at a boot after a takeover, or gone with a VM deleted or failed
        // while Created).
        let in_lives =
            cgroups.iter().filter(|cgroup| lives.iter().any(|life| (life.start_ms..=life.end_ms).contains(&cgroup.removed_ms))).count();
        let booted = journal.booted_vmms.get(vm_id).copied().unwrap_or(0);
        assert_eq!(
            in_lives,
            booted,
            "seed {seed}: {vm_id} booted {booted} VMMs, and {in_lives} of its cgroups went within a life in its usage: {}",
            context()
        );
        for life in &lives {
            let vmms: Vec<&common::cgroups::RemovedCgroup> =
                cgroups.iter().filter(|cgroup| (life.start_ms..=life.end_ms).contains(&cgroup.removed_ms)).collect();
            assert!(!vmms.is_empty(), "seed {seed}: {vm_id} has a VMM life with no cgroup removed while it lasted: {}", context());
            let counted_ns: u64 = vmms.iter().map(|cgroup| cgroup.cpu_ns).sum();
            let charged_ns: u64 = life.rows.iter().map(|row| row.cpu_ns).sum();
            let paused = life.rows.iter().any(|row| row.paused == 1);
            if life.ended_in_gap || paused {
                bounded += 1;
                let why = if paused { "paused" } else { "ended in a gap" };
                eprintln!("seed {seed}: {vm_id}: a life {why} charged {charged_ns} ns of {counted_ns} ns counted");
                assert!(charged_ns <= counted_ns, "seed {seed}: {vm_id} charged {charged_ns} ns for {vmms:?}: {}", context());
            } else {
                exact += 1;
                assert_eq!(charged_ns, counted_ns, "seed {seed}: {vm_id}'s charge for {vmms:?} against their count: {}", context());
            }
        }
    }
    let charged_ns: u64 = rows.iter().map(|row| row.cpu_ns).sum();
    // v2 counts microseconds: each cgroup's count may be up to 1 µs short of its share in the parent's.
    let slack_ns = match counter {
        CgroupCounter::CpuacctNs => 0,
        CgroupCounter::CpuStatUsec => 1000 * totals.values().map(Vec::len).sum::<usize>() as u64,
    };
    eprintln!(
        "seed {seed}: {exact} VMM lives charged exactly their cgroup's count, {bounded} at most it; {charged_ns} ns charged of {counted_ns} ns counted"
    );
    assert!(charged_ns <= counted_ns + slack_ns, "seed {seed}: {charged_ns} ns charged, but the kernel counted only {counted_ns} ns");
}

/// With the spool empty, the operator's summary (read back from ClickHouse
/// by the daemon) counts every interval and VM the raw table holds.
async fn the_operators_usage_summary_is_what_clickhouse_holds(host: &Host, url: &str) {
    let summary = host.operator_client().get_usage_summary(wire::GetUsageSummaryRequest::default()).await.unwrap().into_owned();
    assert!(summary.source.starts_with("clickhouse database metald"), "{}", summary.source);
    let sink = ClickHouseSink::new(url, DATABASE, "summary-check");
    let query = format!("SELECT count(), uniqExact(vm_id), sum(cpu_ns) FROM {DATABASE}.usage_intervals FINAL");
    let (intervals, vms, cpu_ns): (u64, u64, u64) = sink.client().query(&query).fetch_one().await.unwrap();
    let summed = summary.tenants.iter().fold((0, 0, 0.0), |(intervals, vms, cpu), tenant| {
        (intervals + tenant.intervals as u64, vms + tenant.vm_count as u64, cpu + tenant.cpu_seconds)
    });
    assert_eq!((summed.0, summed.1), (intervals, vms), "{summary:?}");
    assert!((summed.2 - cpu_ns as f64 / 1e9).abs() < 1e-6, "{summary:?} against {cpu_ns} ns");
}

#[test]
fn billing_holds_its_invariants_over_random_operations() {
    let test = "billing_holds_its_invariants_over_random_operations";
    let (seeds, steps) = budget();
    for seed in seeds {
        eprintln!("{test}: seed {seed}, {steps} steps (replay: METALD_MODEL_SEEDS={seed} METALD_MODEL_STEPS={steps})");
        let Some(server) = require_clickhouse(test) else { return };
        let options = HostOptions { billing: true, clickhouse_url: Some(server.url()), ..HostOptions::default() };
        let Some(mut host) = Host::start(test, options) else { return };
        let runtime = runtime();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut journal = Journal::default();
        runtime.block_on(async {
            for index in 0..steps {
                let operation = pick(&mut rng);
                eprint!("seed {seed} step {index}: ");
                step(&mut host, &mut rng, &mut journal, operation).await;
            }
            let client = host.client("acme", Wire::ConnectProto);
            for vm_id in live_vms(&client, &journal).await {
                client.delete_vm(wire::DeleteVmRequest { vm_id, force: true, ..Default::default() }).await.unwrap();
            }
        });
        runtime.block_on(host.wait_until_billed());
        let counted = host.cgroup_parent_cpu_ns().expect("the cgroup parent's CPU counter");
        runtime.block_on(the_operators_usage_summary_is_what_clickhouse_holds(&host, &server.url()));
        let status = host.terminate();
        assert!(status.success(), "metald ended with {status}; log:\n{}", host.log());
        let sink = ClickHouseSink::new(&server.url(), DATABASE, "model-check");
        runtime.block_on(check_invariants(&sink, &journal, seed, host.dir.path(), counted));
        assert_eq!(host.leftovers(), Vec::<String>::new(), "seed {seed}");
    }
}
