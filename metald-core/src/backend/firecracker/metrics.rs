//! Firecracker's metrics: every flush writes one JSON line whose counters
//! are deltas since the previous flush. This sums the lines into running
//! totals.
//!
//! Firecracker writes them into a named pipe, not a file: a file only
//! grows (one line of a few KiB per flush, one flush per meter read), and
//! at the VMM's file-size limit the kernel would kill it. A pipe holds only
//! what is not read yet; while nobody reads (metald is down), flushes that
//! find it full are lost, which a taken-over VMM's meter never counts anyway.

use std::fs::File;
use std::io::{self, Read};

use serde::Deserialize;

use crate::backend::DeviceCounters;

#[derive(Debug, Default, Deserialize)]
struct Flush {
    #[serde(default)]
    net: NetCounters,
    #[serde(default)]
    block: BlockCounters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NetCounters {
    rx_bytes_count: u64,
    tx_bytes_count: u64,
    rx_packets_count: u64,
    tx_packets_count: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BlockCounters {
    read_bytes: u64,
    write_bytes: u64,
    read_count: u64,
    write_count: u64,
}

/// Reads a VMM's metrics pipe incrementally.
#[derive(Debug, Default)]
pub struct MetricsReader {
    /// Our end of the current VMM's pipe, opened non-blocking.
    pipe: Option<File>,
    /// The start of a line whose end is not written yet.
    partial: Vec<u8>,
    totals: DeviceCounters,
}

impl MetricsReader {
    /// Adds every complete line written since the last call and returns the totals.
    pub fn update(&mut self) -> io::Result<DeviceCounters> {
        let Some(pipe) = &mut self.pipe else { return Ok(self.totals) };
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buffer) {
                // No writer left: the VMM ended and everything it wrote is read.
                Ok(0) => break,
                Ok(count) => self.partial.extend_from_slice(&buffer[..count]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let mut start = 0;
        while let Some(length) = self.partial[start..].iter().position(|byte| *byte == b'\n') {
            let line = &self.partial[start..start + length];
            start += length + 1;
            match serde_json::from_slice::<Flush>(line) {
                Ok(flush) => add(&mut self.totals, &flush),
                Err(error) => tracing::warn!(%error, "skipping a metrics line that does not parse"),
            }
        }
        // a partial line is finished by the next flush
        self.partial.drain(..start);
        Ok(self.totals)
    }

    /// Reads a new VMM process of the same VM; the totals go on. `pipe`
    /// must be non-blocking: a read never waits for the VMM.
    pub fn follow(&mut self, pipe: File) {
        self.pipe = Some(pipe);
        self.partial.clear();
    }

    /// Counts only what a VMM writes from now on: for a VMM taken over
    /// after a restart, whose earlier flushes an earlier metald counted.
    pub fn follow_from_now(&mut self, pipe: File) -> io::Result<()> {
        self.follow(pipe);
        self.update()?;
        self.partial.clear();
        self.totals = DeviceCounters::default();
        Ok(())
    }
}

fn add(totals: &mut DeviceCounters, flush: &Flush) {
    totals.net_rx_bytes += flush.net.rx_bytes_count;
    totals.net_tx_bytes += flush.net.tx_bytes_count;
    totals.net_rx_packets += flush.net.rx_packets_count;
    totals.net_tx_packets += flush.net.tx_packets_count;
    totals.block_read_bytes += flush.block.read_bytes;
    totals.block_write_bytes += flush.block.write_bytes;
    totals.block_read_ops += flush.block.read_count;
    totals.block_write_ops += flush.block.write_count;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    /// A named pipe in a fresh folder, with our reader and a writer.
    fn pipe() -> (tempfile::TempDir, MetricsReader, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
        let mut reader = MetricsReader::default();
        let pipe = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).unwrap();
        reader.follow(pipe);
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        (dir, reader, writer)
    }

    #[test]
    fn deltas_of_complete_lines_are_summed_once() {
        let (_dir, mut reader, mut writer) = pipe();
        writeln!(
            writer,
            r#"{{"utc_timestamp_ms":1,"net":{{"rx_bytes_count":10,"tx_packets_count":1}},"block":{{"write_bytes":4096,"write_count":1}}}}"#
        )
        .unwrap();
        write!(writer, r#"{{"net":{{"rx_bytes_count":5"#).unwrap();
        let totals = reader.update().unwrap();
        assert_eq!((totals.net_rx_bytes, totals.net_tx_packets, totals.block_write_bytes, totals.block_write_ops), (10, 1, 4096, 1));
        writeln!(writer, r#"}}}}"#).unwrap();
        assert_eq!(reader.update().unwrap().net_rx_bytes, 15);
        assert_eq!(reader.update().unwrap().net_rx_bytes, 15);
        drop(writer);
        assert_eq!(reader.update().unwrap().net_rx_bytes, 15, "a pipe without writers reads as ended, not as an error");
    }

    #[test]
    fn a_new_process_adds_to_the_totals_and_a_taken_over_one_starts_from_what_it_writes_next() {
        let (_dir, mut reader, mut writer) = pipe();
        writeln!(writer, r#"{{"net":{{"rx_bytes_count":7}}}}"#).unwrap();
        assert_eq!(reader.update().unwrap().net_rx_bytes, 7);

        let (_second_dir, second, mut second_writer) = pipe();
        let second_pipe = second.pipe.unwrap();
        reader.follow(second_pipe);
        writeln!(second_writer, r#"{{"net":{{"rx_bytes_count":3}}}}"#).unwrap();
        assert_eq!(reader.update().unwrap().net_rx_bytes, 10);

        let (_third_dir, third, mut third_writer) = pipe();
        writeln!(third_writer, r#"{{"net":{{"rx_bytes_count":100}}}}"#).unwrap();
        reader.follow_from_now(third.pipe.unwrap()).unwrap();
        assert_eq!(reader.update().unwrap().net_rx_bytes, 0, "what was written before the takeover is not counted again");
        writeln!(third_writer, r#"{{"net":{{"rx_bytes_count":2}}}}"#).unwrap();
        assert_eq!(reader.update().unwrap().net_rx_bytes, 2);
    }
}
