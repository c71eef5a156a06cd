//! Presentation: tables and lines for people, proto JSON for scripts. The
//! renderers are pure (message in, text out) so they are tested without a
//! host; [`Printer`] only writes what they produce to stdout. Diagnostics
//! go to stderr and never mix with what a script reads.

mod admin;
mod event;
mod info;
mod list;
mod usage;
pub mod values;

use std::io::{self, Write};

use comfy_table::{ColumnConstraint, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::exit::CliError;

pub use admin::{hosts_table, keys_table, strays_table, tenants_table};
pub use event::event_line;
pub use info::info_table;
pub use list::list_table;
pub use usage::usage_table;

/// Writes a command's result to stdout, as a table or as JSON.
#[derive(Debug)]
pub struct Printer {
    json: bool,
    stdout: io::Stdout,
}

impl Printer {
    pub fn new(json: bool) -> Self {
        Self { json, stdout: io::stdout() }
    }

    /// Whether `--json` was asked for.
    pub fn json_mode(&self) -> bool {
        self.json
    }

    /// One message as indented proto JSON.
    pub fn json<T: Serialize>(&mut self, message: &T) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(message).map_err(json_failed)?;
        self.line(&text)
    }

    /// One message as proto JSON on a single line (for streams).
    pub fn json_line<T: Serialize>(&mut self, message: &T) -> Result<(), CliError> {
        let text = serde_json::to_string(message).map_err(json_failed)?;
        self.line(&text)
    }

    /// A line of text.
    pub fn line(&mut self, text: &str) -> Result<(), CliError> {
        let mut stdout = self.stdout.lock();
        writeln!(stdout, "{text}").and_then(|()| stdout.flush()).map_err(write_failed)
    }

    /// Bytes as they are (console output), flushed at once.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<(), CliError> {
        let mut stdout = self.stdout.lock();
        stdout.write_all(bytes).and_then(|()| stdout.flush()).map_err(write_failed)
    }
}

fn write_failed(source: io::Error) -> CliError {
    CliError::Io { what: "cannot write to standard output".to_owned(), source }
}

fn json_failed(error: serde_json::Error) -> CliError {
    CliError::Unexpected(format!("cannot print the answer as JSON: {error}"))
}

/// A borderless table like `ps` or `kubectl get` print: columns separated
/// by spaces, never wrapped, easy to read and to `awk`.
pub fn plain_table() -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table
}

/// The table as text: no padding before the first column, two spaces
/// between columns, no trailing spaces.
pub fn render(table: &mut Table) -> String {
    let columns = table.column_count();
    for (index, column) in table.column_iter_mut().enumerate() {
        let right = if index + 1 == columns { 0 } else { 2 };
        column.set_padding((0, right));
        column.set_constraint(ColumnConstraint::ContentWidth);
    }
    table.lines().map(|line| line.trim_end().to_owned()).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("\n")
}
