//! `list`: the caller's VMs (with `--all-tenants`, every tenant's, through
//! the operator's service), every page of them unless `--page-token` asks
//! for one page. All pages come back as one ListVmsResponse, so `--json`
//! prints one document either way.

use std::collections::HashSet;
use std::future::Future;

use buffa::EnumValue;
use connectrpc::ConnectError;
use metald_api::proto::vmprovisioner::v1::{ListVmsRequest, ListVmsResponse};

use crate::cli::ListArgs;
use crate::client::Api;
use crate::exit::CliError;
use crate::output::{Printer, list_table};

pub async fn list(api: &Api, out: &mut Printer, args: &ListArgs) -> Result<(), CliError> {
    let request = ListVmsRequest {
        state_filter: args.states.iter().map(|state| EnumValue::from(state.to_wire())).collect(),
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
        ..Default::default()
    };
    let all_tenants = args.all_tenants;
    let fetch = |request| async move {
        let page = match all_tenants {
            true => api.operator().list_vms_with_options(request, api.call()).await?.into_owned(),
            false => api.vms().list_vms_with_options(request, api.call()).await?.into_owned(),
        };
        Ok(page)
    };
    let response = if args.page_token.is_some() { fetch(request).await? } else { all_pages(request, fetch).await? };
    if out.json_mode() {
        return out.json(&response);
    }
    out.line(&list_table(&response, args.all_tenants))?;
    if !response.unreachable_hosts.is_empty() {
        eprintln!("the list is short: these hosts did not answer: {}", response.unreachable_hosts.join(", "));
    }
    if !response.next_page_token.is_empty() {
        eprintln!("more VMs follow: metalctl list --page-token {}", response.next_page_token);
    }
    Ok(())
}

/// Every page from `first` on, as one response: the VMs of all pages in
/// order, the last page's total, no next-page token. A host that hands out
/// the same token twice would keep this going forever, so that stops it.
async fn all_pages<F, Fut>(first: ListVmsRequest, mut fetch: F) -> Result<ListVmsResponse, CliError>
where
    F: FnMut(ListVmsRequest) -> Fut,
    Fut: Future<Output = Result<ListVmsResponse, ConnectError>>,
{
    let mut request = first;
    let mut all = ListVmsResponse::default();
    let mut seen_tokens = HashSet::new();
    loop {
        let page = fetch(request.clone()).await?;
        all.vms.extend(page.vms);
        all.total_count = page.total_count;
        for host in page.unreachable_hosts {
            if !all.unreachable_hosts.contains(&host) {
                all.unreachable_hosts.push(host);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        if !seen_tokens.insert(page.next_page_token.clone()) {
            return Err(CliError::Unexpected(format!(
                "the host returned page token {:?} twice; stopping after {} VMs",
                page.next_page_token,
                all.vms.len()
            )));
        }
        request.page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use metald_api::proto::vmprovisioner::v1::VmInfo;

    use super::*;

    fn page(ids: &[&str], next: &str) -> ListVmsResponse {
        ListVmsResponse {
            vms: ids.iter().map(|id| VmInfo { vm_id: (*id).into(), ..Default::default() }).collect(),
            next_page_token: next.into(),
            total_count: 3,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn every_page_is_fetched_in_order_with_the_filter_kept() {
        let asked = RefCell::new(Vec::new());
        let first = ListVmsRequest { page_size: 2, state_filter: vec![EnumValue::from(2)], ..Default::default() };
        let all = all_pages(first, |request: ListVmsRequest| {
            asked.borrow_mut().push((request.page_token.clone(), request.page_size, request.state_filter.len()));
            let answer = match request.page_token.as_str() {
                "" => page(&["a", "b"], "t1"),
                _ => page(&["c"], ""),
            };
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        let ids: Vec<_> = all.vms.iter().map(|vm| vm.vm_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(all.total_count, 3);
        assert!(all.next_page_token.is_empty());
        assert_eq!(*asked.borrow(), [(String::new(), 2, 1), ("t1".to_owned(), 2, 1)]);
    }

    #[tokio::test]
    async fn a_repeated_page_token_stops_the_paging() {
        let error = all_pages(ListVmsRequest::default(), |_| async { Ok(page(&["a"], "same")) }).await.unwrap_err();
        assert!(matches!(error, CliError::Unexpected(message) if message.contains("twice")));
    }

    #[tokio::test]
    async fn a_failing_page_fails_the_listing() {
        let error = all_pages(ListVmsRequest::default(), |_| async { Err(ConnectError::unauthenticated("no token")) }).await.unwrap_err();
        assert_eq!(error.exit().code(), 6);
    }
}
