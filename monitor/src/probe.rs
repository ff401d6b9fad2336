//! Service probes: an HTTP GET against a service (inside a VM), timed, for service-level
//! objectives. Plain HTTP/1.0 over TCP, bounded in time and in how much is read.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use viola_api::manager::ProbeResult;

/// One configured probe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    pub name: String,
    /// `http://HOST[:PORT]/PATH`
    pub url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    2000
}

/// Splits `http://host[:port]/path` into `(host:port, path)`.
pub fn parse_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', ' ']) || path.contains([' ', '\r', '\n']) {
        return None;
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_owned()))
}

/// Runs one probe: ok when the status line says 2xx within the timeout.
pub async fn run_probe(cfg: &ProbeConfig) -> ProbeResult {
    let fail = |error: String| ProbeResult {
        name: cfg.name.clone(),
        url: cfg.url.clone(),
        ok: false,
        latency_ms: None,
        error: Some(error),
    };
    let Some((authority, path)) = parse_http_url(&cfg.url) else {
        return fail("not an http:// URL".into());
    };
    let started = Instant::now();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&authority).await?;
        let host = authority.split(':').next().unwrap_or_default();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let got = s.read(&mut head[n..]).await?;
            if got == 0 {
                break;
            }
            n += got;
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match tokio::time::timeout(Duration::from_millis(cfg.timeout_ms), exchange).await {
        Err(_) => fail(format!("no answer within {} ms", cfg.timeout_ms)),
        Ok(Err(e)) => fail(e.to_string()),
        Ok(Ok(status)) => {
            let ok = status
                .split_whitespace()
                .nth(1)
                .is_some_and(|code| code.starts_with('2'));
            ProbeResult {
                name: cfg.name.clone(),
                url: cfg.url.clone(),
                ok,
                latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                error: (!ok)
                    .then(|| format!("status line {:?}", status.lines().next().unwrap_or(""))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://10.1.0.5/index.html"),
            Some(("10.1.0.5:80".into(), "/index.html".into()))
        );
        assert_eq!(
            parse_http_url("http://10.1.0.5:8080"),
            Some(("10.1.0.5:8080".into(), "/".into()))
        );
        assert_eq!(parse_http_url("https://x/"), None);
        assert_eq!(parse_http_url("http:///x"), None);
        assert_eq!(parse_http_url("http://a/b c"), None);
    }

    #[tokio::test]
    async fn probe_measures_a_real_http_server_and_reports_a_dead_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhi").await.unwrap();
        });
        let ok = run_probe(&ProbeConfig {
            name: "web".into(),
            url: format!("http://{addr}/"),
            timeout_ms: 2000,
        })
        .await;
        server.await.unwrap();
        assert!(ok.ok, "{ok:?}");
        assert!(ok.latency_ms.is_some());
        // Nothing listens there any more.
        let dead = run_probe(&ProbeConfig {
            name: "web".into(),
            url: format!("http://{addr}/"),
            timeout_ms: 500,
        })
        .await;
        assert!(!dead.ok);
        assert!(dead.error.is_some());
    }
}
