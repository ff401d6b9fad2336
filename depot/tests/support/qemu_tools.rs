//! Running the real `qemu-img` and `qemu-io` in tests.

use std::path::Path;
use std::process::Command;

/// Runs `cmd`, panicking (with its stderr) unless it succeeds.
pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

/// `qemu-img create -q -f qcow2 OPTIONS... PATH [SIZE]` (no size: the backing file's).
pub fn create_qcow2(path: &Path, options: &[&str], size: Option<&str>) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(options)
        .arg(path)
        .args(size));
}

pub fn qemu_io(image: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(image));
}
