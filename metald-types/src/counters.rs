//! What a VMM counts of a VM's devices, as the meter, the store and the
//! billing service carry it.

/// A VM's network and block I/O as its VMM counts it, from the guest's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceCounters {
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub net_rx_packets: u64,
    pub net_tx_packets: u64,
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    pub block_read_ops: u64,
    pub block_write_ops: u64,
}

impl DeviceCounters {
    /// What was counted since `earlier`; a counter that went back (a restarted VMM) counts as zero.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            net_rx_bytes: self.net_rx_bytes.saturating_sub(earlier.net_rx_bytes),
            net_tx_bytes: self.net_tx_bytes.saturating_sub(earlier.net_tx_bytes),
            net_rx_packets: self.net_rx_packets.saturating_sub(earlier.net_rx_packets),
            net_tx_packets: self.net_tx_packets.saturating_sub(earlier.net_tx_packets),
            block_read_bytes: self.block_read_bytes.saturating_sub(earlier.block_read_bytes),
            block_write_bytes: self.block_write_bytes.saturating_sub(earlier.block_write_bytes),
            block_read_ops: self.block_read_ops.saturating_sub(earlier.block_read_ops),
            block_write_ops: self.block_write_ops.saturating_sub(earlier.block_write_ops),
        }
    }
}
