//! `usage`: the host's usage per tenant over a span, from the operator's
//! service. The span is `--since` back from now, or `--from`/`--to`; all
//! the usage the host can read back when neither is given.

use std::time::SystemTime;

use metald_api::proto::vmprovisioner::v1::GetUsageSummaryRequest;

use crate::cli::UsageArgs;
use crate::client::Api;
use crate::exit::CliError;
use crate::output::values::unix_ms;
use crate::output::{Printer, usage_table};

pub async fn usage(api: &Api, out: &mut Printer, args: &UsageArgs) -> Result<(), CliError> {
    let now = SystemTime::now();
    let from = match (args.since, args.from) {
        (Some(since), _) => now.checked_sub(since).map(unix_ms).unwrap_or(0),
        (None, Some(from)) => unix_ms(from),
        (None, None) => 0,
    };
    let to = args.to.map(unix_ms).unwrap_or(0);
    let request = GetUsageSummaryRequest { from_timestamp: from, to_timestamp: to, ..Default::default() };
    let response = api.operator().get_usage_summary_with_options(request, api.call()).await?.into_owned();
    if out.json_mode() { out.json(&response) } else { out.line(&usage_table(&response)) }
}
