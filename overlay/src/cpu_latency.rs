//! An optional CPU wake-up latency request (Linux PM QoS, `/dev/cpu_dma_latency`).
//!
//! Every frame wakes the daemon from `epoll_wait`. On an idle machine the CPU it runs on is then
//! halted, and in a virtual machine a halted vCPU is woken through the hypervisor: on the lab
//! machines that costs tens of microseconds per wake-up, three wake-ups per ping through the
//! overlay. A PM QoS request makes the kernel's idle loop poll instead of halting while the
//! request is held, so the wake-up is immediate. The cost: idle CPUs spin instead of sleeping
//! (power, and CPU time of the hypervisor's host). The request is machine-wide, and it is
//! released when the file is closed (the daemon exits, however it exits).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The kernel's device for CPU latency requests.
pub const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";

/// Why the request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CpuLatencyError {
    /// The device cannot be opened (no root, or no PM QoS in this kernel).
    #[error("cannot open {path} (needs root and a kernel with PM QoS)")]
    Open {
        /// The device.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the value.
    #[error("cannot request a CPU wake-up latency of {us} µs")]
    Write {
        /// The value.
        us: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The value does not fit the kernel's signed 32-bit field.
    #[error("CPU wake-up latency {0} µs is out of range (at most {max})", max = i32::MAX)]
    OutOfRange(u32),
}

/// A held request; dropping it (closing the file) releases it.
#[derive(Debug)]
pub struct CpuLatencyRequest {
    /// Held open for the request's lifetime: the kernel drops the request on close.
    _file: File,
    us: u32,
}

impl CpuLatencyRequest {
    /// Requests that no CPU takes longer than `us` microseconds to wake up.
    pub fn hold(us: u32) -> Result<Self, CpuLatencyError> {
        Self::hold_at(Path::new(PM_QOS_DEVICE), us)
    }

    /// Like [`Self::hold`] on another file (tests).
    pub fn hold_at(path: &Path, us: u32) -> Result<Self, CpuLatencyError> {
        let value = i32::try_from(us).map_err(|_| CpuLatencyError::OutOfRange(us))?;
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| CpuLatencyError::Open {
                path: path.display().to_string(),
                source,
            })?;
        // The kernel reads a native-endian s32 (it also accepts hex text; binary is simpler).
        file.write_all(&value.to_ne_bytes())
            .map_err(|source| CpuLatencyError::Write { us, source })?;
        Ok(Self { _file: file, us })
    }

    /// The requested latency in microseconds.
    pub fn us(&self) -> u32 {
        self.us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_written_as_the_kernels_native_s32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qos");
        std::fs::write(&path, b"").unwrap();
        let req = CpuLatencyRequest::hold_at(&path, 20).unwrap();
        assert_eq!(req.us(), 20);
        assert_eq!(std::fs::read(&path).unwrap(), 20i32.to_ne_bytes());
    }

    #[test]
    fn out_of_range_and_missing_device_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = CpuLatencyRequest::hold_at(&dir.path().join("qos"), u32::MAX).unwrap_err();
        assert!(matches!(err, CpuLatencyError::OutOfRange(_)), "{err}");
        let err = CpuLatencyRequest::hold_at(&dir.path().join("missing"), 0).unwrap_err();
        assert!(err.to_string().contains("cannot open"), "{err}");
    }
}
