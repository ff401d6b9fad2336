//! One TCP connection per request, under one deadline for connect, write and read together,
//! with TLS over it when the client has a TLS configuration.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// A connection whose every read and write fails with [`io::ErrorKind::TimedOut`] once the
/// request's deadline has passed.
pub(crate) struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the request's deadline passed")
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(timed_out())
    } else {
        Ok(left)
    }
}

/// A socket timeout shows as `WouldBlock` on Unix; report it as what it is.
fn map_timeout(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        timed_out()
    } else {
        e
    }
}

impl Deadlined {
    /// Connects to `endpoint` ("host:port"), trying each address it resolves to in turn.
    /// Name resolution itself is not bounded by the deadline (the standard library offers no
    /// way to); endpoints are normally IP addresses.
    pub(crate) fn connect(endpoint: &str, deadline: Instant) -> io::Result<Self> {
        let mut last = None;
        for addr in endpoint.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    return Ok(Self { stream, deadline });
                }
                Err(e) => last = Some(map_timeout(e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address")
        }))
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream
            .set_read_timeout(Some(remaining(self.deadline)?))?;
        self.stream.read(buf).map_err(map_timeout)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream
            .set_write_timeout(Some(remaining(self.deadline)?))?;
        self.stream.write(buf).map_err(map_timeout)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A request's connection: plain, or TLS over it (the handshake runs at the first write, under
/// the same deadline).
pub(crate) enum Transport {
    Plain(Deadlined),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Deadlined>>),
}

impl Transport {
    /// Connects to `endpoint` ("host:port"), with TLS when `tls` is given: the server's
    /// certificate must name the host part (an IP address or a DNS name).
    pub(crate) fn connect(
        endpoint: &str,
        deadline: Instant,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    ) -> io::Result<Self> {
        let tcp = Deadlined::connect(endpoint, deadline)?;
        let Some(tls) = tls else {
            return Ok(Self::Plain(tcp));
        };
        let host = endpoint
            .rsplit_once(':')
            .map_or(endpoint, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let session = rustls::ClientConnection::new(std::sync::Arc::clone(tls), name)
            .map_err(io::Error::other)?;
        Ok(Self::Tls(Box::new(rustls::StreamOwned::new(session, tcp))))
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}
