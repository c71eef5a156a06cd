//! What a failure means to a script: the exit codes metalctl promises, how
//! ConnectRPC error codes map onto them, and how a failure is printed
//! (`error: <code>: <message>` on stderr). It does not decide what counts
//! as a failure; the commands do.

use std::io;
use std::process::ExitCode;

use connectrpc::{ConnectError, ErrorCode};

/// The exit codes, as `--help` and `docs/cli/metalctl.md` document them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the command did what it was asked.
    Success,
    /// 1: something unexpected, or the host failed internally.
    Internal,
    /// 2: the command line (or a file it names) cannot be used.
    Usage,
    /// 3: no such VM.
    NotFound,
    /// 4: the VM already exists, or is in the wrong state for the operation.
    Conflict,
    /// 5: the host refused a value; the message names the field.
    InvalidArgument,
    /// 6: no valid credentials, or not allowed.
    Denied,
    /// 7: a quota or limit was reached.
    Exhausted,
    /// 8: the host cannot be reached or cannot answer now; trying again may help.
    Unavailable,
}

/// The exit code table, shown after `metalctl --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  unexpected or internal error (also: the host cannot do this at all)
  2  usage error: bad flags or arguments, unreadable --config file
  3  not found: no such VM
  4  conflict: the VM already exists, or its state does not allow this
  5  invalid argument: the host refused a value (the message names the field)
  6  unauthenticated or permission denied: check --token / METALD_TOKEN
  7  resource exhausted: a quota or limit was reached
  8  unavailable: cannot connect, the host or the VM's VMM cannot answer now,
     or the deadline (--timeout) passed; trying again may help

Errors are printed to stderr as `error: <code>: <message>`.";

impl Exit {
    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Internal => 1,
            Exit::Usage => 2,
            Exit::NotFound => 3,
            Exit::Conflict => 4,
            Exit::InvalidArgument => 5,
            Exit::Denied => 6,
            Exit::Exhausted => 7,
            Exit::Unavailable => 8,
        }
    }

    /// What a call that failed with `code` exits with.
    pub fn for_rpc(code: ErrorCode) -> Self {
        match code {
            ErrorCode::NotFound => Exit::NotFound,
            ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition | ErrorCode::Aborted => Exit::Conflict,
            ErrorCode::InvalidArgument | ErrorCode::OutOfRange => Exit::InvalidArgument,
            ErrorCode::Unauthenticated | ErrorCode::PermissionDenied => Exit::Denied,
            ErrorCode::ResourceExhausted => Exit::Exhausted,
            ErrorCode::Unavailable | ErrorCode::DeadlineExceeded => Exit::Unavailable,
            ErrorCode::Canceled | ErrorCode::Unknown | ErrorCode::Unimplemented | ErrorCode::Internal | ErrorCode::DataLoss => {
                Exit::Internal
            }
            // ErrorCode is non-exhaustive: a code added later is unexpected here.
            _ => Exit::Internal,
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The host refused or failed the call, or could not be reached.
    #[error("{0}")]
    Rpc(#[from] ConnectError),
    /// The command line, or a file it names, cannot be used.
    #[error("{0}")]
    Usage(String),
    /// Reading input or writing output failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The host answered something metalctl cannot make sense of.
    #[error("{0}")]
    Unexpected(String),
}

impl CliError {
    /// What the process exits with.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Rpc(error) => Exit::for_rpc(error.code),
            CliError::Usage(_) => Exit::Usage,
            CliError::Io { .. } | CliError::Unexpected(_) => Exit::Internal,
        }
    }

    /// A call that never reached the host names the endpoint it tried, so a
    /// wrong `--endpoint` is obvious. The host's own `unavailable` answers
    /// (a VMM that does not respond) carry no transport cause and are left
    /// as they are.
    pub fn naming_endpoint(self, endpoint: &str) -> Self {
        match self {
            CliError::Rpc(error) if error.code == ErrorCode::Unavailable => match error.source_arc() {
                Some(cause) => {
                    let message = error.message.as_deref().unwrap_or("cannot reach the host");
                    let named = ConnectError::new(error.code, format!("{endpoint}: {message}"));
                    CliError::Rpc(named.with_shared_source(cause))
                }
                None => CliError::Rpc(error),
            },
            other => other,
        }
    }

    /// Standard output was closed by its reader (`metalctl list | head`):
    /// not a failure worth reporting.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Prints `error: ...` to stderr and gives the exit code for `error`.
pub fn report(error: &CliError) -> ExitCode {
    if error.is_broken_pipe() {
        return ExitCode::from(Exit::Success.code());
    }
    eprintln!("error: {}", metald_types::error_chain(error));
    ExitCode::from(error.exit().code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metald_types::error_chain;

    fn exit_of(code: ErrorCode) -> u8 {
        CliError::from(ConnectError::new(code, "message")).exit().code()
    }

    #[test]
    fn each_rpc_code_exits_with_its_documented_number() {
        let expected = [
            (ErrorCode::NotFound, 3),
            (ErrorCode::AlreadyExists, 4),
            (ErrorCode::FailedPrecondition, 4),
            (ErrorCode::Aborted, 4),
            (ErrorCode::InvalidArgument, 5),
            (ErrorCode::OutOfRange, 5),
            (ErrorCode::Unauthenticated, 6),
            (ErrorCode::PermissionDenied, 6),
            (ErrorCode::ResourceExhausted, 7),
            (ErrorCode::Unavailable, 8),
            (ErrorCode::DeadlineExceeded, 8),
            (ErrorCode::Internal, 1),
            (ErrorCode::Unknown, 1),
            (ErrorCode::Unimplemented, 1),
            (ErrorCode::DataLoss, 1),
            (ErrorCode::Canceled, 1),
        ];
        for (code, exit) in expected {
            assert_eq!(exit_of(code), exit, "{code:?}");
        }
    }

    #[test]
    fn local_failures_exit_as_usage_or_internal() {
        assert_eq!(CliError::Usage("bad flag".into()).exit(), Exit::Usage);
        assert_eq!(CliError::Unexpected("odd answer".into()).exit(), Exit::Internal);
        let io = CliError::Io { what: "cannot write".into(), source: io::Error::other("disk full") };
        assert_eq!(io.exit(), Exit::Internal);
    }

    #[test]
    fn an_rpc_error_reads_code_then_message() {
        let error = CliError::from(ConnectError::not_found("VM vm-1 does not exist"));
        assert_eq!(error_chain(&error), "not_found: VM vm-1 does not exist");
    }

    #[test]
    fn a_cause_is_told_once() {
        let repeated = CliError::from(ConnectError::unavailable("connect: refused").with_source(io::Error::other("refused")));
        assert_eq!(error_chain(&repeated), "unavailable: connect: refused");
        let io = CliError::Io { what: "cannot read vm.json".into(), source: io::Error::other("permission denied") };
        assert_eq!(error_chain(&io), "cannot read vm.json: permission denied");
    }

    #[test]
    fn a_host_that_cannot_be_reached_is_named() {
        let refused = ConnectError::unavailable_from_transport("HTTP request failed", io::Error::other("connection refused"));
        let named = CliError::from(refused).naming_endpoint("http://10.0.0.5:7070");
        assert_eq!(error_chain(&named), "unavailable: http://10.0.0.5:7070: HTTP request failed: connection refused");
        assert_eq!(named.exit(), Exit::Unavailable);
        let from_host = CliError::from(ConnectError::unavailable("the VMM of VM vm-1 is not running"));
        assert_eq!(error_chain(&from_host.naming_endpoint("http://h")), "unavailable: the VMM of VM vm-1 is not running");
    }

    #[test]
    fn a_closed_pipe_is_not_an_error() {
        let error = CliError::Io { what: "cannot write".into(), source: io::Error::from(io::ErrorKind::BrokenPipe) };
        assert!(error.is_broken_pipe());
        assert!(!CliError::Usage("x".into()).is_broken_pipe());
    }
}
