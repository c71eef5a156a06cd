//! metalctl: the operator's command line for metald.
//!
//! It speaks the `vmprovisioner.v1` API to one metald host or to the
//! gateway in front of many: both take the same bearer token and answer the
//! same calls, so every command works against either. It creates, boots,
//! lists, inspects, pauses, resumes, shuts down, reboots and deletes
//! microVMs, reads a VM's serial console and follows state changes as they
//! happen.
//!
//! Human output is tables; `--json` prints the API's messages as proto JSON
//! for scripts. The exit code says what kind of failure happened (see
//! [`exit`]), so a script can tell "no such VM" from "host unreachable".
//!
//! The binary owns the command line, presentation and exit codes only.
//! What a VM may be is decided by the host; its refusals are passed on as
//! they come, naming the field at fault.

mod cli;
mod client;
mod commands;
mod exit;
mod output;
mod parse;
mod vm_config;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(exit::Exit::Internal.code());
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::from(exit::Exit::Success.code()),
        Err(error) => exit::report(&error),
    }
}
