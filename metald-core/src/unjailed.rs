//! The launcher for development only: each VMM a plain child of metald,
//! with no private root, no namespaces, no cgroup limits and no user of
//! its own. It says so, loudly, at every launch.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;

use async_trait::async_trait;

use crate::launch::{LaunchError, LaunchPlan, Launched, Launcher, Layout, TakeoverTicket};
use crate::process::{ProcessError, Supervised};
use crate::uid_lease::{IdentityCapacity, IdentityLease};

/// Runs VMMs unconfined, as metald's own children.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unjailed;

#[async_trait]
impl Launcher for Unjailed {
    fn is_jailed(&self) -> bool {
        false
    }

    fn lease_identity(&self) -> Result<Option<Arc<IdentityLease>>, LaunchError> {
        Ok(None)
    }

    fn identity_capacity(&self) -> Option<IdentityCapacity> {
        None
    }

    fn take_over_identity(&self, _uid: u32, _gid: u32) -> Result<Option<Arc<IdentityLease>>, LaunchError> {
        Ok(None)
    }

    async fn launch(&self, plan: LaunchPlan) -> Result<Launched, LaunchError> {
        launch_unjailed(plan)
    }

    fn take_over(&self, ticket: TakeoverTicket, _identity: Option<Arc<IdentityLease>>) -> Result<Launched, ProcessError> {
        let process = Supervised::take_over(ticket.pid, ticket.start_time)?;
        Ok(Launched::new(process, ticket.layout, None, None, None))
    }

    fn clean_up_after(&self, _ticket: &TakeoverTicket) -> Vec<String> {
        Vec::new()
    }

    fn sweep_strays(&self, _in_use: &std::collections::BTreeSet<String>) -> Vec<String> {
        Vec::new()
    }

    fn release_host(&self) -> Vec<String> {
        Vec::new()
    }
}

fn launch_unjailed(plan: LaunchPlan) -> Result<Launched, LaunchError> {
    tracing::warn!(
        vm_id = %plan.name,
        "VMM runs UNJAILED: no private root, no namespaces, no cgroup limits, no separate user. For development only."
    );
    let layout = Layout::unjailed(&plan.vm_dir, &plan.files());
    for name in &plan.work_files {
        let path = layout.host(name);
        std::fs::File::create(&path).map_err(|source| LaunchError::Prepare { path: path.clone(), source })?;
    }
    // A socket the VMM makes itself (its API socket) may be left by the
    // VM's previous VMM; a jail starts empty, this folder does not.
    for arg in &plan.args {
        if let Some(name) = arg.file()
            && !plan.work_files.iter().any(|work_file| work_file == name)
        {
            let path = layout.host(name);
            if std::fs::symlink_metadata(&path).is_ok_and(|metadata| std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type())) {
                std::fs::remove_file(&path).map_err(|source| LaunchError::Prepare { path: path.clone(), source })?;
            }
        }
    }
    let mut command = Command::new(&plan.program.host_path);
    for arg in &plan.args {
        command.arg(arg.render(&layout));
    }
    command
        .current_dir(plan.vm_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(plan.stdout))
        .stderr(Stdio::from(plan.stderr))
        // Its own process group: a Ctrl+C meant for metald never reaches the VMs.
        .process_group(0);
    let started = std::time::Instant::now();
    let process = Supervised::spawn(&mut command)?;
    let mut launched = Launched::new(process, layout, None, None, None);
    launched.timings.push(("spawn", started.elapsed()));
    Ok(launched)
}
