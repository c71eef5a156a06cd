//! Boots one microVM through the metald library with the test guest, and
//! prints its console, its state changes and how long each step took.
//!
//! Run with `scripts/demo.sh` (as root, on a host with /dev/kvm).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use metald_core::config::MIB;
use metald_core::jailer::JailerConfig;
use metald_core::operations::{Boot, Delete, Pause, Resume, Shutdown};
use metald_core::{CreateVm, FirecrackerBackend, FirecrackerConfig, StopOptions, TenantId, VmConfig, VmManager};
use metald_testguest::{cmdline, console};

#[tokio::main]
async fn main() -> Result<()> {
    let firecracker = metald_testguest::firecracker_binary().map_err(anyhow::Error::msg)?;
    metald_testguest::kvm_usable().map_err(anyhow::Error::msg)?;
    let workspace = tempfile_dir()?;
    let images = workspace.join("images");
    std::fs::create_dir_all(&images)?;
    std::fs::copy(metald_testguest::kernel_path(), images.join("testguest.elf")).context("copying the test guest into the image root")?;

    // The whole embedding: one builder call.
    let manager = VmManager::builder()
        .backend(Arc::new(FirecrackerBackend::jailed(FirecrackerConfig::new(&firecracker), JailerConfig::default())?))
        .image_root(&images)
        .vm_root(workspace.join("vms"))
        .build()?;

    let started = Instant::now();
    let stamp = move || format!("{:>8.1} ms", started.elapsed().as_secs_f64() * 1000.0);
    let mut events = manager.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            println!("{}  [state]   {} is {} ({:?})", stamp(), event.vm_id, event.state, event.kind);
        }
    });

    let mut config = VmConfig::default();
    config.cpu.vcpu_count = 1;
    config.memory.size_bytes = 64 * MIB;
    config.boot.kernel_path = "testguest.elf".into();
    config.boot.kernel_args = cmdline::heartbeat_ms(200);
    let tenant = TenantId::new("demo")?;

    let mut steps = Vec::new();
    let step = Instant::now();
    let vm_id = manager.create(CreateVm { vm_id: None, tenant, config }).await?;
    steps.push(("create (launch and configure Firecracker)", step.elapsed()));

    let console_log = manager.console(&vm_id)?;
    let mut lines = console_log.subscribe();
    tokio::spawn(async move {
        while let Ok(line) = lines.recv().await {
            println!("{}  [console] {line}", stamp());
        }
    });

    let step = Instant::now();
    manager.run(&vm_id, Boot).await?;
    steps.push(("boot (InstanceStart)", step.elapsed()));
    console_log.wait_for_line(|line| line.starts_with(console::READY), Duration::from_secs(20)).await?;
    steps.push(("boot to the guest's ready line", step.elapsed()));

    console_log.wait_for_line(|line| line.starts_with(console::HEARTBEAT), Duration::from_secs(5)).await?;
    let step = Instant::now();
    manager.run(&vm_id, Pause).await?;
    steps.push(("pause", step.elapsed()));
    println!("{}  (paused: no heartbeat for one second)", stamp());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let step = Instant::now();
    manager.run(&vm_id, Resume).await?;
    steps.push(("resume", step.elapsed()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let step = Instant::now();
    manager.run(&vm_id, Shutdown(StopOptions { force: false, timeout: Some(Duration::from_secs(10)) })).await?;
    steps.push(("graceful shutdown (Ctrl+Alt+Del until the VMM exits)", step.elapsed()));
    let step = Instant::now();
    manager.run(&vm_id, Delete(StopOptions::default())).await?;
    steps.push(("delete", step.elapsed()));
    tokio::time::sleep(Duration::from_millis(50)).await;

    println!("\nStep timings for VM {vm_id}:");
    for (name, took) in steps {
        println!("  {:<55} {:>8.2} ms", name, took.as_secs_f64() * 1000.0);
    }
    std::fs::remove_dir_all(&workspace)?;
    Ok(())
}

/// A fresh folder for the demo's image root and VM folders.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("metald-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
