//! The operations, one file each (lifecycle changes share one): each
//! builds its request from the parsed arguments, makes the call, and hands
//! the answer to the output module. Nothing here formats text or decides
//! exit codes.

mod admin;
mod console;
mod create;
mod info;
mod lifecycle;
mod list;
mod usage;
mod watch;

use crate::cli::{Cli, Command};
use crate::client::Api;
use crate::exit::CliError;
use crate::output::Printer;

/// Runs the command the command line names.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let api = Api::new(&cli.global)?;
    let mut out = Printer::new(cli.global.json);
    dispatch(&api, &mut out, cli.command).await.map_err(|error| error.naming_endpoint(&cli.global.endpoint))
}

async fn dispatch(api: &Api, out: &mut Printer, command: Command) -> Result<(), CliError> {
    match command {
        Command::Create(args) => create::create(api, out, &args).await,
        Command::Boot(args) => lifecycle::boot(api, out, &args.vm_id).await,
        Command::List(args) => list::list(api, out, &args).await,
        Command::Info(args) => info::info(api, out, &args.vm_id).await,
        Command::Pause(args) => lifecycle::pause(api, out, &args.vm_id).await,
        Command::Resume(args) => lifecycle::resume(api, out, &args.vm_id).await,
        Command::Shutdown(args) => lifecycle::shutdown(api, out, &args).await,
        Command::Reboot(args) => lifecycle::reboot(api, out, &args).await,
        Command::Delete(args) => lifecycle::delete(api, out, &args).await,
        Command::Console(args) => console::console(api, out, &args).await,
        Command::Watch(args) => watch::watch(api, out, &args).await,
        Command::Usage(args) => usage::usage(api, out, &args).await,
        Command::Admin(command) => admin::admin(api, out, command).await,
    }
}

/// Resolves when the user presses Ctrl-C; an error if that cannot be
/// listened for.
async fn interrupted() -> Result<(), CliError> {
    tokio::signal::ctrl_c().await.map_err(|source| CliError::Io { what: "cannot listen for Ctrl-C".to_owned(), source })
}
