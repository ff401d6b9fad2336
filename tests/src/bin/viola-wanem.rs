//! `viola-wanem`: a one-way delay line between two interfaces, for the lab's WAN links.
//!
//! This machine's kernel has no `sch_netem`, so the lab's router namespace delays traffic in
//! user space: every frame that arrives on `FROM` is sent out of `TO` once `DELAY_MS` has passed.
//! The rate limit stays in the kernel (a `tbf` qdisc on `TO`), so queueing and drops at the
//! bottleneck behave as on a real link. The delay queue is bounded; frames beyond it are dropped
//! and counted, as a full router buffer would.
//!
//! Usage: `viola-wanem FROM:TO:DELAY_MS [FROM:TO:DELAY_MS ...]` (one thread per link).

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::time::{Duration, Instant};

/// Frames waiting at most; beyond this the link drops (≈ 96 MiB of 1514-byte frames).
const QUEUE_LIMIT_FRAMES: usize = 65_536;
const FRAME_BUFFER: usize = 65_536;

struct Link {
    from: String,
    to: String,
    delay: Duration,
}

fn parse(arg: &str) -> Result<Link, String> {
    let parts: Vec<&str> = arg.split(':').collect();
    let [from, to, delay] = parts.as_slice() else {
        return Err(format!("expected FROM:TO:DELAY_MS, got {arg:?}"));
    };
    let delay_ms: f64 = delay
        .parse()
        .map_err(|_| format!("bad delay {delay:?} in {arg:?}"))?;
    if !(0.0..=10_000.0).contains(&delay_ms) {
        return Err(format!("delay {delay_ms} ms out of range 0..=10000"));
    }
    Ok(Link {
        from: (*from).to_owned(),
        to: (*to).to_owned(),
        delay: Duration::from_secs_f64(delay_ms / 1000.0),
    })
}

fn ifindex(name: &str) -> io::Result<i32> {
    let c = CString::new(name).map_err(|_| io::Error::other("interface name has a NUL"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!("no interface named {name}")));
    }
    Ok(index as i32)
}

/// An AF_PACKET socket bound to `ifindex`; `protocol` 0 makes it send-only.
fn packet_socket(ifindex: i32, protocol: u16, nonblocking: bool) -> io::Result<i32> {
    let flags = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | flags | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: addr is a properly initialised sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    Ok(fd)
}

fn run(link: &Link) -> io::Result<()> {
    let rx = packet_socket(ifindex(&link.from)?, libc::ETH_P_ALL as u16, true)?;
    let tx_index = ifindex(&link.to)?;
    let tx = packet_socket(tx_index, 0, false)?;
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; FRAME_BUFFER];
    let mut dropped: u64 = 0;
    loop {
        let timeout_ms = match queue.front() {
            Some((due, _)) => {
                let wait = due.saturating_duration_since(Instant::now());
                // Round up so we never spin; sub-millisecond precision is not needed here.
                i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        let mut pfd = libc::pollfd {
            fd: rx,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        loop {
            // SAFETY: zeroed sockaddr_ll is valid for recvfrom to fill.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and from are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    rx,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::addr_of_mut!(from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                break;
            }
            // Frames the kernel sends out of FROM are not ours to forward.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if queue.len() >= QUEUE_LIMIT_FRAMES {
                dropped += 1;
                if dropped.is_power_of_two() {
                    eprintln!(
                        "viola-wanem {}->{}: {dropped} frames dropped",
                        link.from, link.to
                    );
                }
                continue;
            }
            queue.push_back((Instant::now() + link.delay, buf[..n as usize].to_vec()));
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, frame)) = queue.pop_front() else {
                break;
            };
            // SAFETY: frame is a valid buffer; tx is bound to the output interface.
            unsafe { libc::send(tx, frame.as_ptr().cast(), frame.len(), 0) };
        }
    }
}

fn main() {
    let links: Result<Vec<Link>, String> = std::env::args().skip(1).map(|a| parse(&a)).collect();
    let links = match links {
        Ok(links) if !links.is_empty() => links,
        Ok(_) => {
            eprintln!("usage: viola-wanem FROM:TO:DELAY_MS [FROM:TO:DELAY_MS ...]");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("viola-wanem: {e}");
            std::process::exit(2);
        }
    };
    std::thread::scope(|scope| {
        for link in &links {
            scope.spawn(move || {
                if let Err(e) = run(link) {
                    eprintln!("viola-wanem: link {} -> {}: {e}", link.from, link.to);
                    std::process::exit(1);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links_and_rejects_garbage() {
        let link = parse("da:wan-a:10").unwrap();
        assert_eq!((link.from.as_str(), link.to.as_str()), ("da", "wan-a"));
        assert_eq!(link.delay, Duration::from_millis(10));
        assert!(parse("da:wan-a").is_err());
        assert!(parse("da:wan-a:-1").is_err());
        assert!(parse("da:wan-a:soon").is_err());
    }
}
