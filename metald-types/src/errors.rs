//! An error told on one line with every cause below it, as logs and
//! replies show it.

/// An error and every cause below it, outermost first, joined by ": ". A
/// cause whose text the line already holds is not told again: many errors
/// repeat their source in their own message.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the spool")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("database is locked: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_is_told_once_outermost_first() {
        let error = Outer(Middle(std::io::Error::other("busy")));
        assert_eq!(error_chain(&error), "cannot open the spool: database is locked: busy");
    }
}
