//! Printing errors with their whole source chain, as binaries do at the top.

use std::error::Error;

/// Formats `err` and every source below it as `top: cause: root cause`.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some libraries repeat their source's message in their own; do not print it twice.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start overlay")]
    struct Top(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot bind 198.18.1.11:4433")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn prints_every_level() {
        let err = Top(Middle(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "address in use",
        )));
        assert_eq!(
            chain(&err),
            "cannot start overlay: cannot bind 198.18.1.11:4433: address in use"
        );
    }
}
