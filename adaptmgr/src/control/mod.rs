//! The manager's control plane: the wire format ([`wire`]), the messages ([`proto`]), the
//! QUIC + mutual-TLS server that monitors and the CLI talk to ([`server`]) and its client
//! ([`client`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod wire;

#[cfg(test)]
mod fuzz_seeds;
#[cfg(test)]
mod tests;
