//! The manager's QUIC + mutual-TLS server that monitors and the CLI talk to ([`server`]); its
//! messages, framing and client are in `viola-api`.

pub mod server;
#[cfg(test)]
mod tests;
