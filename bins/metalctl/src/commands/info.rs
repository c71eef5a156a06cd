//! `info`: one GetVmInfo call; key/value rows for people, the full
//! response as proto JSON with `--json`.

use metald_api::proto::vmprovisioner::v1::GetVmInfoRequest;

use crate::client::Api;
use crate::exit::CliError;
use crate::output::values::now_ms;
use crate::output::{Printer, info_table};

pub async fn info(api: &Api, out: &mut Printer, vm_id: &str) -> Result<(), CliError> {
    let request = GetVmInfoRequest { vm_id: vm_id.to_owned(), ..Default::default() };
    let response = api.vms().get_vm_info_with_options(request, api.call()).await?.into_owned();
    if out.json_mode() { out.json(&response) } else { out.line(&info_table(&response, now_ms())) }
}
