//! A minimal Prometheus text endpoint: `GET /metrics` answers the registry's encoding.
//!
//! Deliberately tiny (no HTTP framework): one request per connection, bounded request size,
//! closed at shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A registry shared between the components that register metrics and the endpoint.
pub type SharedRegistry = Arc<Mutex<Registry>>;

/// Binds `addr` and returns the bound address and a future serving `/metrics` until `token` is
/// cancelled. The caller spawns (and supervises) the future.
pub async fn serve(
    addr: SocketAddr,
    registry: SharedRegistry,
    token: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let fut = async move {
        loop {
            let accepted = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let body = encode(&registry);
            // One short exchange per connection; a slow client cannot hold the loop for long.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async move {
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.unwrap_or(0);
                let wanted = request[..n].starts_with(b"GET /metrics");
                let (status, body) = if wanted {
                    ("200 OK", body)
                } else {
                    ("404 Not Found", String::from("try /metrics\n"))
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        }
    };
    Ok((bound, fut))
}

/// The registry in Prometheus text format.
pub fn encode(registry: &SharedRegistry) -> String {
    let mut out = String::new();
    let guard = registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Encoding into a String cannot fail for the metric types we register.
    let _ = prometheus_client::encoding::text::encode(&mut out, &guard);
    out
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[tokio::test]
    async fn serves_registered_counters() {
        let registry: SharedRegistry = Arc::new(Mutex::new(Registry::default()));
        let frames = Counter::<u64>::default();
        registry
            .lock()
            .unwrap()
            .register("viola_test_frames", "frames seen", frames.clone());
        frames.inc_by(7);
        let token = CancellationToken::new();
        let (addr, fut) = serve("127.0.0.1:0".parse().unwrap(), registry, token.clone())
            .await
            .unwrap();
        let server = tokio::spawn(fut);
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("viola_test_frames_total 7"), "{reply}");
        token.cancel();
        server.await.unwrap();
    }
}
