//! Printing errors with their whole source chain, as binaries do at the top, and that top:
//! [`exit_code`] and [`run_main`].

use std::error::Error;
use std::process::ExitCode;

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

/// A binary's exit code for `result`; an error is printed first, as `name: top: cause: …`.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Runs binary `name`'s asynchronous main on a multi-threaded runtime; its exit code as
/// [`exit_code`] gives it.
pub fn run_main(name: &str, main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => exit_code(name, runtime.block_on(main)),
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
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
