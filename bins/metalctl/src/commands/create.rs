//! `create`: the VmConfig from `--config` and the flags, one CreateVm call,
//! and with `--boot` a BootVm right after. People get the new VM's id alone
//! on stdout (`VM=$(metalctl create ...)`); `--json` prints the
//! CreateVmResponse, its state updated by the boot when there was one.

use buffa::{EnumValue, MessageField};
use metald_api::proto::vmprovisioner::v1::{BootVmRequest, CreateVmRequest, CreateVmResponse, VmState};

use crate::cli::CreateArgs;
use crate::client::Api;
use crate::commands::lifecycle::unsuccessful;
use crate::exit::CliError;
use crate::output::Printer;
use crate::vm_config;

pub async fn create(api: &Api, out: &mut Printer, args: &CreateArgs) -> Result<(), CliError> {
    let config = vm_config::build(args)?;
    let request =
        CreateVmRequest { vm_id: args.vm_id.clone().unwrap_or_default(), config: MessageField::some(config), ..Default::default() };
    let mut created = api.vms().create_vm_with_options(request, api.call()).await?.into_owned();
    if args.boot {
        let booted = boot(api, &created.vm_id).await;
        if let Ok(state) = &booted {
            created.state = *state;
        }
        print_created(out, &created)?;
        if booted.is_err() {
            eprintln!("metalctl: VM {} was created but did not boot", created.vm_id);
        }
        return booted.map(drop);
    }
    print_created(out, &created)
}

/// Boots the new VM; its state afterwards.
async fn boot(api: &Api, vm_id: &str) -> Result<EnumValue<VmState>, CliError> {
    let request = BootVmRequest { vm_id: vm_id.to_owned(), ..Default::default() };
    let response = api.vms().boot_vm_with_options(request, api.call()).await?.into_owned();
    if response.success { Ok(response.state) } else { Err(unsuccessful(vm_id, "boot")) }
}

fn print_created(out: &mut Printer, created: &CreateVmResponse) -> Result<(), CliError> {
    if out.json_mode() { out.json(created) } else { out.line(&created.vm_id) }
}
