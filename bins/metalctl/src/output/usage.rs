//! The `usage` table: one row per tenant, then the span and where the
//! figures were read from.

use metald_api::proto::vmprovisioner::v1::GetUsageSummaryResponse;

use super::values::{format_bytes, format_count, format_time};
use super::{plain_table, render};

/// TENANT, VMS, INTERVALS, CPU-S, VCPU-S, GIB-S (allocated memory),
/// RESIDENT GIB-S, network and block bytes; seconds to three places.
pub fn usage_table(response: &GetUsageSummaryResponse) -> String {
    let from = match response.from_timestamp {
        0 => "the first record".to_owned(),
        from => format_time(from),
    };
    let span = format!(
        "from {from} to {}, read from {}; usage still in the host's spool is not in it yet",
        format_time(response.to_timestamp),
        response.source
    );
    if response.tenants.is_empty() {
        return format!("No usage {span}.");
    }
    let mut table = plain_table();
    table.set_header([
        "TENANT",
        "VMS",
        "INTERVALS",
        "CPU-S",
        "VCPU-S",
        "GIB-S",
        "RESIDENT GIB-S",
        "NET RX",
        "NET TX",
        "BLOCK READ",
        "BLOCK WRITE",
    ]);
    for tenant in &response.tenants {
        table.add_row([
            tenant.customer_id.clone(),
            tenant.vm_count.to_string(),
            format_count(tenant.intervals),
            format!("{:.3}", tenant.cpu_seconds),
            format!("{:.3}", tenant.vcpu_seconds),
            format!("{:.3}", tenant.memory_gib_seconds),
            format!("{:.3}", tenant.resident_memory_gib_seconds),
            format_bytes(tenant.net_rx_bytes),
            format_bytes(tenant.net_tx_bytes),
            format_bytes(tenant.block_read_bytes),
            format_bytes(tenant.block_write_bytes),
        ]);
    }
    format!("{}\n\nUsage {span}.", render(&mut table))
}

#[cfg(test)]
mod tests {
    use metald_api::proto::vmprovisioner::v1::TenantUsage;

    use super::*;

    #[test]
    fn each_tenant_is_a_row_and_the_span_and_source_follow() {
        let response = GetUsageSummaryResponse {
            tenants: vec![TenantUsage {
                customer_id: "acme".into(),
                vm_count: 2,
                intervals: 1_200,
                cpu_seconds: 1.5,
                vcpu_seconds: 240.0,
                memory_gib_seconds: 30.0,
                resident_memory_gib_seconds: 2.25,
                net_rx_bytes: 2048,
                ..Default::default()
            }],
            source: "file /var/lib/metald/usage.jsonl".into(),
            from_timestamp: 1_714_564_800_000,
            to_timestamp: 1_714_568_400_000,
            ..Default::default()
        };
        let expected = "\
TENANT  VMS  INTERVALS  CPU-S  VCPU-S   GIB-S   RESIDENT GIB-S  NET RX  NET TX  BLOCK READ  BLOCK WRITE
acme    2    1,200      1.500  240.000  30.000  2.250           2 KiB   0 B     0 B         0 B

Usage from 2024-05-01T12:00:00Z to 2024-05-01T13:00:00Z, read from file /var/lib/metald/usage.jsonl; \
usage still in the host's spool is not in it yet.";
        assert_eq!(usage_table(&response), expected);
    }

    #[test]
    fn no_usage_says_so_with_the_span() {
        let response = GetUsageSummaryResponse { source: "file u.jsonl".into(), to_timestamp: 1_714_564_800_000, ..Default::default() };
        assert!(usage_table(&response).starts_with("No usage from the first record to 2024-05-01T12:00:00Z, read from file u.jsonl"));
    }
}
