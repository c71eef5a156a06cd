//! `console`: the last bytes a VM wrote to its serial console, as they are.
//! With `--follow` it asks again every 500 ms and prints only what is new,
//! until Ctrl-C. The API gives the console's tail, not an offset, so what
//! is new is found by overlap: the longest end of the previous tail that
//! the next one starts with was seen already. Output that repeats itself
//! exactly can make that guess short; more than a whole tail written
//! between two reads is lost, which stderr warns of when no overlap is found.
//! A VM deleted while followed ends the follow as a finished stream does,
//! with a line on stderr and exit code 0.

use std::pin::pin;
use std::time::Duration;

use metald_api::proto::vmprovisioner::v1::{GetConsoleRequest, GetConsoleResponse};
use tokio::time::MissedTickBehavior;

use crate::cli::ConsoleArgs;
use crate::client::Api;
use crate::commands::interrupted;
use crate::exit::CliError;
use crate::output::Printer;

/// How often `--follow` reads the console.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

pub async fn console(api: &Api, out: &mut Printer, args: &ConsoleArgs) -> Result<(), CliError> {
    let request = GetConsoleRequest { vm_id: args.vm_id.clone(), max_bytes: args.bytes.unwrap_or(0), ..Default::default() };
    let mut stop = pin!(interrupted());
    let first = tokio::select! {
        result = &mut stop => return result,
        response = read(api, &request) => response?,
    };
    print(out, &first)?;
    if !args.follow {
        return Ok(());
    }
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut previous = first.data;
    loop {
        let current = tokio::select! {
            result = &mut stop => return result,
            response = async {
                ticker.tick().await;
                read(api, &request).await
            } => match response {
                Err(CliError::Rpc(error)) if error.code == connectrpc::ErrorCode::NotFound => {
                    eprintln!("metalctl: VM {} was deleted; its console ended", args.vm_id);
                    return Ok(());
                }
                response => response?,
            },
        };
        let overlap = seen_before(&previous, &current.data);
        if overlap == 0 && !previous.is_empty() && !current.data.is_empty() {
            eprintln!("metalctl: console output may have been lost: a whole tail was written between two reads (a larger --bytes helps)");
        }
        let fresh = &current.data[overlap..];
        if !fresh.is_empty() {
            print(out, &GetConsoleResponse { vm_id: current.vm_id.clone(), data: fresh.to_vec(), ..Default::default() })?;
        }
        previous = current.data;
    }
}

async fn read(api: &Api, request: &GetConsoleRequest) -> Result<GetConsoleResponse, CliError> {
    Ok(api.vms().get_console_with_options(request.clone(), api.call()).await?.into_owned())
}

/// Raw bytes for people; a GetConsoleResponse per line (data in base64) for `--json`.
fn print(out: &mut Printer, response: &GetConsoleResponse) -> Result<(), CliError> {
    if out.json_mode() { out.json_line(response) } else { out.raw(&response.data) }
}

/// How many of `current`'s first bytes `previous` already ended with: the
/// longest suffix of `previous` that is a prefix of `current`, found in
/// linear time with the Knuth-Morris-Pratt failure function of `current`.
fn seen_before(previous: &[u8], current: &[u8]) -> usize {
    if current.is_empty() {
        return 0;
    }
    // failure[i]: the longest proper prefix of current[..=i] that is also its suffix.
    let mut failure = vec![0; current.len()];
    let mut length = 0;
    for index in 1..current.len() {
        while length > 0 && current[index] != current[length] {
            length = failure[length - 1];
        }
        if current[index] == current[length] {
            length += 1;
        }
        failure[index] = length;
    }
    let mut matched = 0;
    for &byte in previous {
        while matched > 0 && (matched == current.len() || current[matched] != byte) {
            matched = failure[matched - 1];
        }
        if current[matched] == byte {
            matched += 1;
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh<'a>(previous: &str, current: &'a str) -> &'a str {
        &current[seen_before(previous.as_bytes(), current.as_bytes())..]
    }

    #[test]
    fn a_growing_console_yields_what_was_appended() {
        assert_eq!(fresh("", "boot\n"), "boot\n");
        assert_eq!(fresh("boot\n", "boot\nlogin: "), "login: ");
        assert_eq!(fresh("boot\n", "boot\n"), "");
    }

    #[test]
    fn a_full_tail_that_slid_yields_only_the_new_end() {
        // The tail holds 8 bytes: "abcdefgh", then 3 more were written.
        assert_eq!(fresh("abcdefgh", "defghijk"), "ijk");
    }

    #[test]
    fn more_than_a_tail_between_reads_yields_the_whole_new_tail() {
        assert_eq!(fresh("abcdefgh", "qrstuvwx"), "qrstuvwx");
    }

    #[test]
    fn repeated_output_is_matched_at_its_longest_overlap() {
        assert_eq!(fresh("abc", "abcabc"), "abc");
        assert_eq!(fresh("aaaa", "aaaab"), "b");
        assert_eq!(fresh("xxab", "ababab"), "abab");
    }

    #[test]
    fn an_empty_console_has_nothing_new() {
        assert_eq!(fresh("abc", ""), "");
        assert_eq!(fresh("", ""), "");
    }
}
