//! The jail's price: create+boot to the guest's ready line with the
//! integrated jailer against the same without it, in the same run, and
//! where the jail's time goes, step by step.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use metald_benches::{BenchHost, Recorder, ms, timed_iterations};

fn jail(c: &mut Criterion) {
    let Some(jailed) = BenchHost::new() else { return };
    let Some(unjailed) = BenchHost::unjailed() else { return };
    let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
    let (with_jail, without_jail) = (&Recorder::default(), &Recorder::default());
    let steps: &Mutex<BTreeMap<&'static str, Vec<Duration>>> = &Mutex::new(BTreeMap::new());

    let mut group = c.benchmark_group("create_boot_to_ready_jail");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_millis(500));
    for (name, host, recorder) in [("unjailed", &unjailed, without_jail), ("jailed", &jailed, with_jail)] {
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iterations| {
                timed_iterations(&runtime, iterations, |_| async move {
                    let (phases, vm_id) = host.library_boot_phases().await.unwrap_or_else(|error| panic!("{name} boot: {error}"));
                    let took = phases.total();
                    if let Ok(mut steps) = steps.lock() {
                        for (phase, duration) in [("create", phases.create), ("boot", phases.boot), ("boot_to_ready_line", phases.to_ready)]
                        {
                            steps.entry(if name == "jailed" { phase } else { unjailed_phase(phase) }).or_default().push(duration);
                        }
                    }
                    if name == "jailed" {
                        let timings = host.launch_timings(&vm_id).await;
                        if let Ok(mut steps) = steps.lock() {
                            for (step, duration) in timings {
                                steps.entry(step).or_default().push(duration);
                            }
                        }
                    }
                    host.library_delete(&vm_id).await.unwrap_or_else(|error| panic!("delete: {error}"));
                    recorder.record(took);
                    took
                })
            })
        });
    }
    group.finish();

    let (jailed_median, unjailed_median) = (with_jail.median(), without_jail.median());
    println!("\ncreate+boot to ready, same guest, same run:");
    println!("  unjailed: median {} over {} boots", ms(unjailed_median), without_jail.samples().len());
    println!("  jailed:   median {} over {} boots", ms(jailed_median), with_jail.samples().len());
    println!(
        "  ratio jailed / unjailed: {:.2} (the jail adds {})",
        jailed_median.as_secs_f64() / unjailed_median.as_secs_f64().max(f64::EPSILON),
        ms(jailed_median.saturating_sub(unjailed_median))
    );
    println!("where a create+boot spends its time (median per phase, and per step of a jailed launch):");
    if let Ok(steps) = steps.lock() {
        for (step, durations) in steps.iter() {
            println!("  {step:<26} {}", ms(metald_benches::median(durations)));
        }
    }
}

/// The unjailed host's name for a phase, listed beside the jailed one's.
fn unjailed_phase(phase: &'static str) -> &'static str {
    match phase {
        "create" => "create (unjailed)",
        "boot" => "boot (unjailed)",
        _ => "boot_to_ready_line (unjailed)",
    }
}

criterion_group!(benches, jail);
criterion_main!(benches);
