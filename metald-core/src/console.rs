//! A VM's serial console: captured from the VMM into a file of its own with
//! a size cap, readable as a tail, and published line by line to whoever
//! subscribes (tests, demos, a future console stream).
//!
//! At the cap, `console.log` is renamed to `console.log.1` (replacing the
//! previous one) and a fresh `console.log` begins, so the disk holds at most
//! twice the cap and the newest output is always kept. Nothing here knows
//! which VMM produced the bytes.
//!
//! A VMM's own pipe is captured with `splice(2)`: the kernel moves its bytes
//! into the file in one call, so a metald killed at any instant has lost
//! none of them, and a metald that takes the same VMM over continues the
//! file exactly where the pipe resumes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::SpliceFFlags;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// Lines longer than this are published in pieces.
const MAX_LINE_BYTES: usize = 4096;
/// Lines a follower of the console may fall behind by. The channel holds
/// a slot per line from the start, so the logs that are only waited on
/// (a VMM's stderr and log) keep a few.
const CONSOLE_LINE_CAPACITY: usize = 1024;
const LOG_LINE_CAPACITY: usize = 16;
/// The most one read or splice moves at a time.
/// The most one splice moves.
const CHUNK_BYTES: usize = 16 * 1024;
/// What one read of a non-pipe source takes (a VMM's filtered log).
const READ_CHUNK_BYTES: usize = 4096;

thread_local! {
    /// Where a splice's bytes are read back to be published as lines. A
    /// capture uses it only between two awaits, so every capture on a
    /// thread shares one, instead of each VM holding buffers of its own.
    static SPLICED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `use_chunk` on this thread's scratch buffer, `CHUNK_BYTES` long.
fn with_scratch<T>(use_chunk: impl FnOnce(&mut [u8]) -> T) -> T {
    SPLICED.with_borrow_mut(|scratch| {
        scratch.resize(CHUNK_BYTES, 0);
        use_chunk(scratch)
    })
}
pub const CONSOLE_FILE: &str = "console.log";
pub const ROTATED_CONSOLE_FILE: &str = "console.log.1";

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot {action} console file {path}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no console line matched within {0:?}")]
    Timeout(Duration),
    #[error("the console ended before a line matched")]
    Ended,
}

/// How a capture's stream relates to what the log already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureStart {
    /// A stream of its own (a VMM just launched): when the last capture
    /// was cut off mid-line, it starts a line of its own.
    NewStream,
    /// The stream the last capture read, taken over after a restart of
    /// metald: it goes on exactly where the file ends, mid-line or not.
    SameStream,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    rotated_path: PathBuf,
    limit_bytes: u64,
    /// Made by the first subscriber: most consoles never have one, and a
    /// channel holds all its slots from the start.
    lines: std::sync::OnceLock<broadcast::Sender<Arc<str>>>,
    line_capacity: usize,
    /// How many captures run; none before the first VMM and after the last.
    captures: watch::Sender<usize>,
}

/// The console of one VM. Cloning it gives another handle to the same log.
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    shared: Arc<Shared>,
}

fn file_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ConsoleError + 'a {
    move |source| ConsoleError::File { action, path: path.to_path_buf(), source }
}

impl ConsoleLog {
    /// A console logging into `dir`, keeping at most `limit_bytes` per file.
    pub fn new(dir: &Path, limit_bytes: u64) -> Self {
        Self::with_capacity(dir, CONSOLE_FILE, limit_bytes, CONSOLE_LINE_CAPACITY)
    }

    /// A log of any byte stream (a VMM's stderr, say) in `dir/file_name`,
    /// rotated the same way to `file_name.1`. Made to be waited on, not
    /// followed: a subscriber more than a few lines behind is told it lagged.
    pub fn named(dir: &Path, file_name: &str, limit_bytes: u64) -> Self {
        Self::with_capacity(dir, file_name, limit_bytes, LOG_LINE_CAPACITY)
    }

    fn with_capacity(dir: &Path, file_name: &str, limit_bytes: u64, line_capacity: usize) -> Self {
        let (captures, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                path: dir.join(file_name),
                rotated_path: dir.join(format!("{file_name}.1")),
                limit_bytes: limit_bytes.max(1),
                lines: std::sync::OnceLock::new(),
                line_capacity,
                captures,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Copies everything `source` yields into the log until it ends (the
    /// VMM closed its side), in a task of its own.
    pub fn capture<R>(&self, source: R) -> Result<JoinHandle<()>, ConsoleError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let writer = Writer::open(Arc::clone(&self.shared), CaptureStart::NewStream)?;
        self.shared.captures.send_modify(|count| *count += 1);
        Ok(tokio::spawn(writer.run(source)))
    }

    /// Moves everything a VMM writes into `pipe` into the log until its
    /// writers have closed it, in a task of its own. Nothing read from the
    /// pipe is ever only in memory, so a kill of metald loses none of it.
    pub fn capture_pipe(&self, pipe: pipe::Receiver, start: CaptureStart) -> Result<JoinHandle<()>, ConsoleError> {
        let writer = Writer::open(Arc::clone(&self.shared), start)?;
        self.shared.captures.send_modify(|count| *count += 1);
        Ok(tokio::spawn(writer.run_pipe(pipe)))
    }

    /// New lines from now on. A receiver that falls more lines behind than
    /// the channel holds (1024 for a console) loses the oldest and is told
    /// so (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.shared.lines.get_or_init(|| broadcast::channel(self.shared.line_capacity).0).subscribe()
    }

    /// The last `max_bytes` of output, across the rotated file and the current one.
    pub fn tail(&self, max_bytes: usize) -> Result<Vec<u8>, ConsoleError> {
        let current = read_tail(&self.shared.path, max_bytes)?;
        let wanted_from_rotated = max_bytes.saturating_sub(current.len());
        if wanted_from_rotated == 0 {
            return Ok(current);
        }
        let mut output = read_tail(&self.shared.rotated_path, wanted_from_rotated)?;
        output.extend_from_slice(&current);
        Ok(output)
    }

    /// Waits for a line that satisfies `matches`, looking first at what is
    /// already logged, and returns it. Fails as soon as the VMM closes its
    /// side without having printed such a line.
    pub async fn wait_for_line(&self, matches: impl Fn(&str) -> bool, timeout: Duration) -> Result<String, ConsoleError> {
        let mut lines = self.subscribe();
        let mut captures = self.shared.captures.subscribe();
        if let Some(line) = self.find_logged(&matches)? {
            return Ok(line);
        }
        let wait = async {
            let mut ended = false;
            loop {
                tokio::select! {
                    received = lines.recv() => match received {
                        Ok(line) if matches(&line) => return Ok(line.to_string()),
                        Ok(_) => {}
                        // The lines skipped are in the file.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if let Some(line) = self.find_logged(&matches)? {
                                return Ok(line);
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return Err(ConsoleError::Ended),
                    },
                    changed = captures.wait_for(|count| *count == 0), if !ended => {
                        ended = changed.is_ok();
                        if !ended {
                            return Err(ConsoleError::Ended);
                        }
                    },
                    else => return Err(ConsoleError::Ended),
                }
                if ended && lines.is_empty() {
                    return Err(ConsoleError::Ended);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await.map_err(|_| ConsoleError::Timeout(timeout))? {
            // A line that came in the last lag, with nothing after it to report the lag, is in the file.
            Err(ConsoleError::Ended) => self.find_logged(&matches)?.ok_or(ConsoleError::Ended),
            other => other,
        }
    }

    fn find_logged(&self, matches: &impl Fn(&str) -> bool) -> Result<Option<String>, ConsoleError> {
        let logged = self.tail(usize::try_from(self.shared.limit_bytes).unwrap_or(usize::MAX))?;
        Ok(String::from_utf8_lossy(&logged).lines().find(|line| matches(line)).map(str::to_owned))
    }
}

fn read_tail(path: &Path, max_bytes: usize) -> Result<Vec<u8>, ConsoleError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(file_error("open", path)(error)),
    };
    let length = file.metadata().map_err(file_error("inspect", path))?.len();
    let start = length.saturating_sub(u64::try_from(max_bytes).unwrap_or(u64::MAX));
    file.seek(SeekFrom::Start(start)).map_err(file_error("seek in", path))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(file_error("read", path))?;
    Ok(bytes)
}

fn ends_mid_line(file: &File, length: u64) -> io::Result<bool> {
    if length == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, length - 1)?;
    Ok(last[0] != b'\n')
}

/// The single writer of a console log. It writes at its own offset rather
/// than in append mode, as `splice(2)` refuses a file opened to append.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    written: u64,
    partial_line: Vec<u8>,
}

impl Writer {
    fn open(shared: Arc<Shared>, start: CaptureStart) -> Result<Self, ConsoleError> {
        let file = crate::private_files::open_write(&shared.path).map_err(file_error("open", &shared.path))?;
        let written = file.metadata().map_err(file_error("inspect", &shared.path))?.len();
        let mut writer = Self { shared, file, written, partial_line: Vec::new() };
        // An earlier stream cut off mid-line (its VMM ended, or output was
        // lost): what a new one says starts a line of its own.
        if start == CaptureStart::NewStream && ends_mid_line(&writer.file, written).map_err(file_error("read", &writer.shared.path))? {
            writer.append(b"\n")?;
        }
        Ok(writer)
    }

    async fn run<R: AsyncRead + Unpin>(mut self, mut source: R) {
        let mut buffer = vec![0; READ_CHUNK_BYTES];
        loop {
            let count = match source.read(&mut buffer).await {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(path = %self.shared.path.display(), %error, "console source failed");
                    break;
                }
            };
            if let Err(error) = self.append(&buffer[..count]) {
                tracing::warn!(path = %self.shared.path.display(), error = %crate::error_chain(&error), "console output dropped");
            }
            self.publish_lines(&buffer[..count]);
        }
        self.finish();
    }

    async fn run_pipe(mut self, pipe: pipe::Receiver) {
        loop {
            if let Err(error) = pipe.readable().await {
                tracing::warn!(path = %self.shared.path.display(), %error, "console source failed");
                break;
            }
            match self.splice_from(&pipe) {
                Ok(0) => break,
                Ok(_) => {}
                Err(SpliceError::Source(error)) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(SpliceError::Source(error)) => {
                    tracing::warn!(path = %self.shared.path.display(), %error, "console source failed");
                    break;
                }
                Err(SpliceError::Log(error)) => {
                    tracing::warn!(path = %self.shared.path.display(), error = %crate::error_chain(&error), "console output dropped");
                    // The VMM must not stall on a full pipe: what the log
                    // cannot take is read and dropped.
                    match with_scratch(|scratch| pipe.try_read(scratch)) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                        Err(error) => {
                            tracing::warn!(path = %self.shared.path.display(), %error, "console source failed");
                            break;
                        }
                    }
                }
            }
        }
        self.finish();
    }

    /// Moves what `pipe` holds, up to the cap, into the file and publishes
    /// it. Returns 0 once every writer of the pipe has closed it.
    fn splice_from(&mut self, pipe: &pipe::Receiver) -> Result<usize, SpliceError> {
        if self.written >= self.shared.limit_bytes {
            self.rotate().map_err(SpliceError::Log)?;
        }
        let room = usize::try_from(self.shared.limit_bytes - self.written).unwrap_or(usize::MAX).min(CHUNK_BYTES);
        let start = self.written;
        let mut offset = i64::try_from(start).unwrap_or(i64::MAX);
        let moved = pipe
            .try_io(|| {
                nix::fcntl::splice(pipe, None, &self.file, Some(&mut offset), room, SpliceFFlags::SPLICE_F_NONBLOCK)
                    .map_err(io::Error::from)
            })
            .map_err(|error| self.classify_splice_error(error))?;
        self.written += moved as u64;
        with_scratch(|scratch| {
            let chunk = &mut scratch[..moved];
            self.file.read_exact_at(chunk, start).map_err(|source| SpliceError::Log(file_error("read", &self.shared.path)(source)))?;
            self.publish_lines(chunk);
            Ok(moved)
        })
    }

    /// `splice(2)` answers for both ends at once: an error the pipe can
    /// cause is the source's, any other the file's.
    fn classify_splice_error(&self, error: io::Error) -> SpliceError {
        let from_pipe = matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
            || error.raw_os_error() == Some(nix::errno::Errno::EBADF as i32);
        if from_pipe { SpliceError::Source(error) } else { SpliceError::Log(file_error("write", &self.shared.path)(error)) }
    }

    fn append(&mut self, mut chunk: &[u8]) -> Result<(), ConsoleError> {
        while !chunk.is_empty() {
            if self.written >= self.shared.limit_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.shared.limit_bytes - self.written).unwrap_or(usize::MAX);
            let (now, later) = chunk.split_at(chunk.len().min(room));
            self.file.write_all_at(now, self.written).map_err(file_error("write", &self.shared.path))?;
            self.written += now.len() as u64;
            chunk = later;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), ConsoleError> {
        let shared = &self.shared;
        std::fs::rename(&shared.path, &shared.rotated_path).map_err(file_error("rotate", &shared.path))?;
        self.file = crate::private_files::open_write(&shared.path).map_err(file_error("open", &shared.path))?;
        self.written = 0;
        Ok(())
    }

    fn publish_lines(&mut self, mut chunk: &[u8]) {
        while let Some(end) = chunk.iter().position(|byte| *byte == b'\n') {
            self.partial_line.extend_from_slice(&chunk[..end]);
            let line = std::mem::take(&mut self.partial_line);
            self.publish(&line);
            chunk = &chunk[end + 1..];
        }
        self.partial_line.extend_from_slice(chunk);
        while self.partial_line.len() >= MAX_LINE_BYTES {
            let rest = self.partial_line.split_off(MAX_LINE_BYTES);
            let line = std::mem::replace(&mut self.partial_line, rest);
            self.publish(&line);
        }
    }

    fn publish(&self, line: &[u8]) {
        // Nobody listening is fine: the file keeps everything.
        let Some(lines) = self.shared.lines.get().filter(|lines| lines.receiver_count() > 0) else { return };
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let _ = lines.send(Arc::from(text));
    }

    /// The stream ended: its last words are a line, and one capture fewer runs.
    fn finish(mut self) {
        if !self.partial_line.is_empty() {
            let rest = std::mem::take(&mut self.partial_line);
            self.publish(&rest);
        }
        self.shared.captures.send_modify(|count| *count = count.saturating_sub(1));
    }
}

/// Which end of a splice failed.
enum SpliceError {
    Source(io::Error),
    Log(ConsoleError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_logged_and_published() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 1024);
        let mut lines = console.subscribe();
        let task = console.capture(&b"first\r\nsecond\npartial"[..]).unwrap();
        task.await.unwrap();
        assert_eq!(&*lines.recv().await.unwrap(), "first");
        assert_eq!(&*lines.recv().await.unwrap(), "second");
        assert_eq!(&*lines.recv().await.unwrap(), "partial");
        assert_eq!(console.tail(1024).unwrap(), b"first\r\nsecond\npartial");
        assert_eq!(console.tail(7).unwrap(), b"partial");
        let line = console.wait_for_line(|line| line.starts_with("sec"), Duration::from_millis(10)).await.unwrap();
        assert_eq!(line, "second");
    }

    #[tokio::test]
    async fn at_the_cap_the_log_rotates_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 10);
        let output: Vec<u8> = (0..35u8).map(|i| b'a' + i % 26).collect();
        console.capture(io::Cursor::new(output.clone())).unwrap().await.unwrap();
        let current = std::fs::read(dir.path().join(CONSOLE_FILE)).unwrap();
        let rotated = std::fs::read(dir.path().join(ROTATED_CONSOLE_FILE)).unwrap();
        assert_eq!(current, &output[30..]);
        assert_eq!(rotated, &output[20..30]);
        assert_eq!(console.tail(100).unwrap(), &output[20..]);
        assert_eq!(console.tail(8).unwrap(), &output[27..]);
    }

    #[tokio::test]
    async fn waiting_for_a_line_that_never_comes_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 1024);
        let (_writer, reader) = tokio::io::duplex(64);
        let _task = console.capture(reader).unwrap();
        let error = console.wait_for_line(|line| line == "never", Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(error, ConsoleError::Timeout(_)));
    }

    #[tokio::test]
    async fn waiting_after_the_vmm_closed_its_side_ends_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 1024);
        console.capture(&b"only line\n"[..]).unwrap().await.unwrap();
        let error = console.wait_for_line(|line| line == "never", Duration::from_secs(30)).await.unwrap_err();
        assert!(matches!(error, ConsoleError::Ended), "{error}");
    }

    #[tokio::test]
    async fn a_capture_after_one_cut_off_mid_line_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 1 << 20);
        console.capture(&b"whole\ncut off mid"[..]).unwrap().await.unwrap();
        console.capture(&b"next line\n"[..]).unwrap().await.unwrap();
        console.capture(&b"and one more\n"[..]).unwrap().await.unwrap();
        let text = std::fs::read_to_string(dir.path().join(CONSOLE_FILE)).unwrap();
        assert_eq!(text, "whole\ncut off mid\nnext line\nand one more\n");
    }

    /// Captures `output` written into a real pipe, which is then closed.
    async fn capture_through_a_pipe(console: &ConsoleLog, output: &[u8], start: CaptureStart) {
        let (mut sender, receiver) = pipe::pipe().unwrap();
        let task = console.capture_pipe(receiver, start).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut sender, output).await.unwrap();
        drop(sender);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_pipe_taken_over_continues_its_line_and_a_new_one_starts_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 1 << 20);
        let mut lines = console.subscribe();
        capture_through_a_pipe(&console, b"whole\ncut off ", CaptureStart::NewStream).await;
        capture_through_a_pipe(&console, b"mid-line\n", CaptureStart::SameStream).await;
        capture_through_a_pipe(&console, b"a new VMM's ", CaptureStart::NewStream).await;
        capture_through_a_pipe(&console, b"first line\n", CaptureStart::NewStream).await;
        let text = std::fs::read_to_string(dir.path().join(CONSOLE_FILE)).unwrap();
        assert_eq!(text, "whole\ncut off mid-line\na new VMM's \nfirst line\n");
        assert_eq!(&*lines.recv().await.unwrap(), "whole");
        assert_eq!(&*lines.recv().await.unwrap(), "cut off ");
        assert_eq!(&*lines.recv().await.unwrap(), "mid-line");
    }

    #[tokio::test]
    async fn a_pipe_at_the_cap_rotates_as_any_stream_does() {
        let dir = tempfile::tempdir().unwrap();
        let console = ConsoleLog::new(dir.path(), 10);
        let output: Vec<u8> = (0..35u8).map(|i| b'a' + i % 26).collect();
        capture_through_a_pipe(&console, &output, CaptureStart::NewStream).await;
        assert_eq!(std::fs::read(dir.path().join(CONSOLE_FILE)).unwrap(), &output[30..]);
        assert_eq!(std::fs::read(dir.path().join(ROTATED_CONSOLE_FILE)).unwrap(), &output[20..30]);
    }

    /// Writes `wanted` and then far more lines than a log's channel holds, all
    /// at once, while a waiter for `wanted` listens; closes the stream after
    /// the burst if `then_close`. Returns what the waiter found.
    async fn wait_through_a_burst(wanted: &str, then_close: bool) -> Result<String, ConsoleError> {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::named(dir.path(), "vmm.log", 1 << 20);
        let (mut writer, reader) = tokio::io::duplex(1 << 16);
        let _task = log.capture(reader).unwrap();
        let mut burst = format!("{wanted}\n");
        for number in 0..10 * LOG_LINE_CAPACITY {
            burst.push_str(&format!("noise {number}\n"));
        }
        // join! polls the waiter first: it listens before the burst is written.
        let waiting = log.wait_for_line(|line| line == wanted, Duration::from_secs(30));
        let writing = async {
            tokio::io::AsyncWriteExt::write_all(&mut writer, burst.as_bytes()).await.unwrap();
            if then_close {
                tokio::io::AsyncWriteExt::shutdown(&mut writer).await.unwrap();
            }
        };
        tokio::join!(waiting, writing).0
    }

    #[tokio::test]
    async fn a_waiter_that_lagged_behind_a_burst_still_finds_its_line_in_the_file() {
        assert_eq!(wait_through_a_burst("exit_code=151", true).await.unwrap(), "exit_code=151");
    }

    #[tokio::test]
    async fn a_waiter_that_lagged_while_the_stream_stays_open_finds_its_line_in_the_file() {
        assert_eq!(wait_through_a_burst("ready", false).await.unwrap(), "ready");
    }
}
