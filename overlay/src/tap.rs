//! A TAP opened with `IFF_VNET_HDR` and the kernel's offloads (`TUNSETOFFLOAD`): every read
//! and write starts with a `virtio_net_hdr` ([`crate::offload::VnetHdr`]), and the kernel hands
//! over (and takes) TCP frames of up to 64 KiB instead of one per MTU.
//!
//! Our own few ioctls rather than a crate: `tun-tap` (still used without offloads) cannot set
//! `IFF_VNET_HDR`, and `tun-rs`, which can, handles offloads only for L3 TUN devices (it reads
//! the IP version from byte 0, a MAC on a TAP) while a violin needs an L2 TAP.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::offload::VNET_HDR_LEN;

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD` bits.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is empty, too long or not ASCII")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("{what} on TAP {name}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP with a `virtio_net_hdr` on every frame.
#[derive(Debug)]
pub struct VnetTap {
    file: File,
    name: String,
    offloads: u32,
}

impl VnetTap {
    /// Opens (creating if needed) the TAP `name`, non-blocking, with `IFF_VNET_HDR` and the
    /// offloads checksum, TSO4/6 (with ECN) and, where the kernel has them (≥ 6.2), USO4/6.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.is_ascii() {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let fd = file.as_raw_fd();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fail = |what| {
            let name = name.to_owned();
            move |source| TapError::Ioctl { what, name, source }
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out in full.
        check(unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) }).map_err(fail("TUNSETIFF"))?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        check(unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_len) })
            .map_err(fail("TUNSETVNETHDRSZ"))?;
        let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        let mut offloads = tso | TUN_F_USO4 | TUN_F_USO6;
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument itself.
        if check(unsafe { libc::ioctl(fd, TUNSETOFFLOAD, offloads as libc::c_ulong) }).is_err() {
            // Kernels before 6.2 refuse the USO bits.
            offloads = tso;
            // SAFETY: as above.
            check(unsafe { libc::ioctl(fd, TUNSETOFFLOAD, offloads as libc::c_ulong) })
                .map_err(fail("TUNSETOFFLOAD"))?;
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .ok()
            .and_then(|c| c.to_str().ok())
            .unwrap_or(name)
            .to_owned();
        Ok(Self {
            file,
            name,
            offloads,
        })
    }

    /// The device's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUNSETOFFLOAD` bits in force.
    #[must_use]
    pub fn offloads(&self) -> u32 {
        self.offloads
    }

    /// The device's `IFF_*` flags as the kernel reports them.
    pub fn flags(&self) -> io::Result<u16> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills a `struct ifreq`.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), TUNGETIFF, &mut req) })?;
        Ok(req.flags as u16)
    }

    /// Reads one frame: its `virtio_net_hdr` into `hdr`, the frame into `buf`; returns the
    /// frame's length (a frame longer than `buf` is cut).
    pub fn recv(&self, hdr: &mut [u8; VNET_HDR_LEN], buf: &mut [u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        // SAFETY: both iovecs point into live, exclusively borrowed buffers of their lengths.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        n.checked_sub(VNET_HDR_LEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short TAP read"))
    }

    /// Writes one frame made of `parts`, the first of which is its `virtio_net_hdr`.
    pub fn send(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        let cnt = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many parts"))?;
        // SAFETY: the iovecs point into live buffers of their lengths, only read by writev.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), cnt) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for VnetTap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{GSO_TCPV4, NEEDS_CSUM, VnetHdr};

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        for n in ["", "a-name-that-is-too-long", "tä"] {
            assert!(matches!(VnetTap::open(n), Err(TapError::BadName(_))), "{n}");
        }
    }

    /// Sets the link `name` up (in the calling thread's network namespace).
    fn link_up(name: &str) -> io::Result<()> {
        // SAFETY: a plain socket used for two SIOC*IFFLAGS ioctls, closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        check(s)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a `struct ifreq`.
        let r = check(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) }).and_then(|()| {
            req.flags |= libc::IFF_UP as libc::c_short;
            // SAFETY: as above.
            check(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &req) })
        });
        // SAFETY: `s` is our socket.
        unsafe { libc::close(s) };
        r
    }

    /// Opens a TAP in a network namespace of its own (a thread that unshared its namespace,
    /// gone with the thread: nothing is left behind in the host's), as root only.
    #[test]
    fn the_kernel_takes_vnet_headers_and_refuses_bad_ones() {
        std::thread::spawn(|| {
            // SAFETY: unshare only affects this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: no CAP_SYS_ADMIN to make a network namespace");
                return;
            }
            let tap = VnetTap::open("vtest0").expect("TAP opens");
            assert_eq!(tap.name(), "vtest0");
            let flags = tap.flags().unwrap();
            assert_ne!(flags & IFF_VNET_HDR as u16, 0, "IFF_VNET_HDR set");
            assert_ne!(flags & IFF_TAP as u16, 0);
            assert_eq!(
                tap.offloads() & (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
                TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
            );
            link_up("vtest0").unwrap();
            let (hdr, frame) =
                crate::offload::segment::tests::tso_frame(false, 1, 0, 0x10, 0, &[7; 5000], 1400);
            assert_eq!((hdr.gso_type, hdr.flags), (GSO_TCPV4, NEEDS_CSUM));
            let n = tap
                .send(&[&hdr.encode(), &frame])
                .expect("a TSO frame is taken");
            assert_eq!(n, VNET_HDR_LEN + frame.len());
            let bad = VnetHdr {
                // 2 is no GSO type (3, UFO, is still taken).
                gso_type: 2,
                ..hdr
            };
            let e = tap.send(&[&bad.encode(), &frame]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "unknown gso_type");
        })
        .join()
        .unwrap();
    }
}
