//! Firecracker's own log as metald keeps it. Firecracker writes it into a
//! named pipe that metald reads into a capped, rotated file, the way it
//! keeps the console: a file Firecracker wrote itself would grow until the
//! VMM's file-size limit killed it.
//!
//! At its Info level Firecracker logs two lines for every API call. The
//! calls metald makes routinely, a metrics flush at each meter read and a
//! state read at each `GetVmInfo` (which a tenant can loop), would fill the
//! log with lines that say nothing about the VM and push out the lines that
//! do. They are left out here; every other line, errors of routine calls
//! included, is kept.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A line longer than this is passed on in pieces, unjudged.
const MAX_LINE_BYTES: usize = 16 * 1024;
const READ_CHUNK_BYTES: usize = 4096;
/// Lines of other threads held back while a routine call waits for its answer.
const MAX_HELD_LINES: usize = 64;

/// Firecracker's log stream without the lines of routine API calls.
#[derive(Debug)]
pub(super) struct WithoutRoutineCalls<R> {
    source: R,
    /// Bytes read from the source, not yet judged (no line end yet).
    unjudged: Vec<u8>,
    /// A routine call's request and the lines of other threads after it,
    /// until the API thread's next line says whether the call succeeded.
    held: Vec<Vec<u8>>,
    /// Kept bytes not yet handed to the reader.
    kept: Vec<u8>,
    kept_from: usize,
    ended: bool,
}

/// What a line is to the filter.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    RoutineRequest,
    Success,
    OtherCall,
    Other,
}

/// `<time> [<vm id>:<thread>:<level>] <message>`
fn classify(line: &[u8]) -> Line {
    const ROUTINE_REQUESTS: [&str; 2] = [
        "The API server received a Get request",
        r#"The API server received a Put request on "/actions" with body "{\"action_type\":\"FlushMetrics\"}"."#,
    ];
    let text = String::from_utf8_lossy(line);
    let Some((origin, message)) = text.split_once("] ") else { return Line::Other };
    if origin.ends_with(":fc_api:INFO") {
        if ROUTINE_REQUESTS.iter().any(|request| message.starts_with(request)) {
            return Line::RoutineRequest;
        }
        if message.starts_with("The request was executed successfully.") {
            return Line::Success;
        }
    }
    if origin.contains(":fc_api:") { Line::OtherCall } else { Line::Other }
}

impl<R> WithoutRoutineCalls<R> {
    pub(super) fn new(source: R) -> Self {
        Self { source, unjudged: Vec::new(), held: Vec::new(), kept: Vec::new(), kept_from: 0, ended: false }
    }

    fn judge_complete_lines(&mut self) {
        let mut start = 0;
        while let Some(length) = self.unjudged[start..].iter().position(|byte| *byte == b'\n') {
            let end = start + length + 1;
            let line = self.unjudged[start..end].to_vec();
            self.judge(line);
            start = end;
        }
        self.unjudged.drain(..start);
        if self.unjudged.len() >= MAX_LINE_BYTES || (self.ended && !self.unjudged.is_empty()) {
            let rest = std::mem::take(&mut self.unjudged);
            self.judge(rest);
        }
        if self.ended {
            self.release_held();
        }
    }

    fn judge(&mut self, line: Vec<u8>) {
        let holding = !self.held.is_empty();
        match classify(&line) {
            Line::RoutineRequest => {
                self.release_held();
                self.held.push(line);
            }
            Line::Success if holding => {
                for other in self.held.drain(1..) {
                    self.kept.extend_from_slice(&other);
                }
                self.held.clear();
            }
            Line::Other if holding && self.held.len() < MAX_HELD_LINES => self.held.push(line),
            Line::Success | Line::OtherCall | Line::Other => {
                self.release_held();
                self.kept.extend_from_slice(&line);
            }
        }
    }

    /// Keeps what was held, in order: the call's answer was no success.
    fn release_held(&mut self) {
        for line in self.held.drain(..) {
            self.kept.extend_from_slice(&line);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for WithoutRoutineCalls<R> {
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buffer: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.kept_from < this.kept.len() {
                let available = &this.kept[this.kept_from..];
                let count = available.len().min(buffer.remaining());
                buffer.put_slice(&available[..count]);
                this.kept_from += count;
                if this.kept_from == this.kept.len() {
                    this.kept.clear();
                    this.kept_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut chunk_buffer = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.source).poll_read(context, &mut chunk_buffer) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {
                    let read = chunk_buffer.filled();
                    this.ended = read.is_empty();
                    this.unjudged.extend_from_slice(read);
                    this.judge_complete_lines();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    const LOG: &str = concat!(
        "2026-12-03T07:51:41.218628932 [vm-1:main:INFO] Running Firecracker v1.12.1\n",
        "2026-12-03T07:51:41.731290194 [vm-1:fc_api:INFO] The API server received a Get request on \"/\".\n",
        "2026-12-03T07:51:41.731300000 [vm-1:fc_vcpu 0:INFO] Received KVM_EXIT_HLT\n",
        "2026-12-03T07:51:41.731333999 [vm-1:fc_api:INFO] The request was executed successfully. Status code: 200 OK.\n",
        "2026-12-03T07:51:41.739577255 [vm-1:fc_api:INFO] The API server received a Put request on \"/actions\" with body \"{\\\"action_type\\\":\\\"FlushMetrics\\\"}\".\n",
        "2026-12-03T07:51:41.739674921 [vm-1:fc_api:INFO] The request was executed successfully. Status code: 204 No Content.\n",
        "2026-12-03T07:51:41.747171597 [vm-1:fc_api:INFO] The API server received a Put request on \"/machine-config\" with body \"{}\".\n",
        "2026-12-03T07:51:41.747233729 [vm-1:fc_api:INFO] The request was executed successfully. Status code: 204 No Content.\n",
        "2026-12-03T07:51:41.759577255 [vm-1:fc_api:INFO] The API server received a Put request on \"/actions\" with body \"{\\\"action_type\\\":\\\"FlushMetrics\\\"}\".\n",
        "2026-12-03T07:51:41.759674921 [vm-1:fc_api:ERROR] Received Error. Status code: 400 Bad Request. Message: not started.\n",
        "2026-12-03T07:51:42.000000000 [vm-1:main:INFO] Firecracker exiting successfully. exit_code=0",
    );

    async fn filtered(input: &[u8]) -> String {
        let mut output = String::new();
        WithoutRoutineCalls::new(input).read_to_string(&mut output).await.unwrap();
        output
    }

    #[tokio::test]
    async fn routine_calls_that_succeed_leave_no_line_and_everything_else_is_kept() {
        let output = filtered(LOG.as_bytes()).await;
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 7, "{output}");
        assert!(lines[0].ends_with("Running Firecracker v1.12.1"));
        assert!(lines[1].ends_with("KVM_EXIT_HLT"), "another thread's line during a routine call is kept: {output}");
        assert!(lines[2].contains("\"/machine-config\""), "other calls are kept: {output}");
        assert!(lines[3].contains("executed successfully"), "with their answers: {output}");
        assert!(lines[4].contains("FlushMetrics"), "a routine call that fails is kept: {output}");
        assert!(lines[5].contains("Received Error"), "with its answer: {output}");
        assert!(lines[6].ends_with("exit_code=0"), "a last line without its end is kept: {output}");
    }

    #[tokio::test]
    async fn lines_split_across_reads_are_judged_whole() {
        let (mut writer, reader) = tokio::io::duplex(7);
        let writing = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut writer, LOG.as_bytes()).await.unwrap();
        });
        let mut output = String::new();
        WithoutRoutineCalls::new(reader).read_to_string(&mut output).await.unwrap();
        writing.await.unwrap();
        assert_eq!(output, filtered(LOG.as_bytes()).await);
    }

    #[tokio::test]
    async fn an_endless_line_is_passed_on_in_pieces() {
        let line = vec![b'x'; 3 * MAX_LINE_BYTES];
        assert_eq!(filtered(&line).await.len(), line.len());
    }
}
