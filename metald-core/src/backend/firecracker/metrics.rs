//! Firecracker's metrics file: every flush appends one JSON line whose
//! counters are deltas since the previous flush. This sums the lines not
//! yet read into running totals.

use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};
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

/// Reads a metrics file incrementally.
#[derive(Debug, Default)]
pub struct MetricsReader {
    offset: u64,
    /// Bytes from the start already given back to the file system.
    punched: u64,
    totals: DeviceCounters,
}

/// Holes are punched in whole file-system blocks.
const HOLE_ALIGNMENT: u64 = 4096;

impl MetricsReader {
    /// Adds every complete line written since the last call and returns the totals.
    pub fn update(&mut self, path: &Path) -> io::Result<DeviceCounters> {
        // Write access only to give consumed lines' blocks back (below).
        let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(self.totals),
            Err(error) => return Err(error),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break; // a partial line is finished by the next flush
            }
            self.offset += read as u64;
            match serde_json::from_str::<Flush>(&line) {
                Ok(flush) => self.add(&flush),
                Err(error) => tracing::warn!(path = %path.display(), %error, "skipping a metrics line that does not parse"),
            }
        }
        // Firecracker appends a line at every flush and never truncates; a VM
        // metered with a flush a second would grow its file by megabytes an
        // hour. Punching out what was read frees the disk and keeps the offsets.
        let consumed = self.offset - self.offset % HOLE_ALIGNMENT;
        if consumed > self.punched {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let length = i64::try_from(consumed).unwrap_or(i64::MAX);
            match fallocate(reader.get_ref(), mode, 0, length) {
                Ok(()) => self.punched = consumed,
                Err(error) => tracing::debug!(path = %path.display(), %error, "cannot give a metrics file's read lines back"),
            }
        }
        Ok(self.totals)
    }

    /// Counts only what a VMM writes from now on: for a VMM taken over
    /// after a restart, whose earlier lines were read (and punched out) by
    /// an earlier metald.
    pub fn skip_to_end(&mut self, path: &Path) {
        self.offset = std::fs::metadata(path).map(|metadata| metadata.len()).unwrap_or(0);
        self.punched = self.offset - self.offset % HOLE_ALIGNMENT;
        self.totals = DeviceCounters::default();
    }

    /// Starts over for a new VMM process, whose file starts empty.
    pub fn restart(&mut self) {
        self.offset = 0;
        self.punched = 0;
    }

    fn add(&mut self, flush: &Flush) {
        let totals = &mut self.totals;
        totals.net_rx_bytes += flush.net.rx_bytes_count;
        totals.net_tx_bytes += flush.net.tx_bytes_count;
        totals.net_rx_packets += flush.net.rx_packets_count;
        totals.net_tx_packets += flush.net.tx_packets_count;
        totals.block_read_bytes += flush.block.read_bytes;
        totals.block_write_bytes += flush.block.write_bytes;
        totals.block_read_ops += flush.block.read_count;
        totals.block_write_ops += flush.block.write_count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    #[test]
    fn deltas_of_complete_lines_are_summed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics");
        let mut file = File::create(&path).unwrap();
        writeln!(
            file,
            r#"{{"utc_timestamp_ms":1,"net":{{"rx_bytes_count":10,"tx_packets_count":1}},"block":{{"write_bytes":4096,"write_count":1}}}}"#
        )
        .unwrap();
        write!(file, r#"{{"net":{{"rx_bytes_count":5"#).unwrap();
        let mut reader = MetricsReader::default();
        let totals = reader.update(&path).unwrap();
        assert_eq!((totals.net_rx_bytes, totals.net_tx_packets, totals.block_write_bytes, totals.block_write_ops), (10, 1, 4096, 1));
        writeln!(file, r#"}}}}"#).unwrap();
        let totals = reader.update(&path).unwrap();
        assert_eq!(totals.net_rx_bytes, 15);
        assert_eq!(reader.update(&path).unwrap().net_rx_bytes, 15);
    }

    #[test]
    fn lines_read_give_their_disk_space_back_and_later_lines_still_count() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics");
        let mut file = File::create(&path).unwrap();
        let line = format!("{{\"net\":{{\"rx_bytes_count\":1}},\"padding\":\"{}\"}}\n", "x".repeat(1000));
        for _ in 0..100 {
            file.write_all(line.as_bytes()).unwrap();
        }
        file.sync_all().unwrap();
        let mut reader = MetricsReader::default();
        assert_eq!(reader.update(&path).unwrap().net_rx_bytes, 100);
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!(metadata.len(), 100 * line.len() as u64, "the size stays, so the writer's offset stays valid");
        assert!(metadata.blocks() * 512 < 8192, "{} bytes still allocated", metadata.blocks() * 512);
        file.write_all(line.as_bytes()).unwrap();
        assert_eq!(reader.update(&path).unwrap().net_rx_bytes, 101);
    }
}
