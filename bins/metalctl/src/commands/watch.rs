//! `watch`: the WatchVms stream, one line per event (one JSON object per
//! line with `--json`), until Ctrl-C or until the host ends the stream.
//! Either way ends cleanly; an error in the stream is reported like any
//! failed call. A host that ends the stream does not resend what happened
//! meanwhile: `list` or `info` tells the state after reconnecting.

use std::pin::pin;

use metald_api::proto::vmprovisioner::v1::WatchVmsRequest;

use crate::cli::WatchArgs;
use crate::client::Api;
use crate::commands::interrupted;
use crate::exit::CliError;
use crate::output::{Printer, event_line};

pub async fn watch(api: &Api, out: &mut Printer, args: &WatchArgs) -> Result<(), CliError> {
    let request = WatchVmsRequest { vm_id: args.vm_id.clone().unwrap_or_default(), ..Default::default() };
    let mut stop = pin!(interrupted());
    let mut stream = tokio::select! {
        result = &mut stop => return result,
        stream = api.vms().watch_vms_with_options(request, api.stream()) => stream?,
    };
    // The host subscribes before it answers, so from here on no event is missed;
    // a script can wait for this line before it acts.
    eprintln!("metalctl: watching {} (Ctrl-C to stop)", args.vm_id.as_deref().unwrap_or("all your VMs"));
    loop {
        let message = tokio::select! {
            result = &mut stop => return result,
            message = stream.message() => message?,
        };
        let Some(message) = message else {
            eprintln!("metalctl: the host ended the event stream");
            return Ok(());
        };
        let event = message.to_owned_message();
        if out.json_mode() {
            out.json_line(&event)?;
        } else {
            out.line(&event_line(&event))?;
        }
    }
}
