//! Certificates for lab tests, issued the way an operator issues them: with `viola-ca` (build
//! it first: `daemons::build(&["viola-common"])`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::daemons::bin;
use crate::run_ok;

/// A federation CA in a directory of its own.
pub struct Pki {
    ca_dir: PathBuf,
}

impl Pki {
    /// Makes a new CA in `ca_dir` (`viola-ca init`).
    pub fn init(ca_dir: &Path) -> Result<Self> {
        run_ok(
            Command::new(bin("viola-ca"))
                .args(["init", "--ca-dir"])
                .arg(ca_dir),
        )?;
        Ok(Self {
            ca_dir: ca_dir.to_owned(),
        })
    }

    /// The CA already in `ca_dir` (the lab's, say).
    pub fn open(ca_dir: &Path) -> Self {
        Self {
            ca_dir: ca_dir.to_owned(),
        }
    }

    /// Issues an identity of `role` (`overlay`, `depot`, `adaptmgr`, `monitor`, `cli`) for
    /// `host` of `site` into the directory `out`; returns `out`.
    pub fn issue(&self, role: &str, site: &str, host: &str, out: &Path) -> Result<PathBuf> {
        self.issue_with_addresses(role, site, host, &[], out)
    }

    /// [`issue`](Self::issue), the certificate also naming `addresses` (where browsers reach
    /// the daemon: the manager's dashboard).
    pub fn issue_with_addresses(
        &self,
        role: &str,
        site: &str,
        host: &str,
        addresses: &[&str],
        out: &Path,
    ) -> Result<PathBuf> {
        let mut cmd = Command::new(bin("viola-ca"));
        cmd.args(["issue", "--ca-dir"])
            .arg(&self.ca_dir)
            .args(["--role", role, "--site", site, "--host", host, "--out"])
            .arg(out);
        for a in addresses {
            cmd.args(["--address", a]);
        }
        run_ok(&mut cmd)?;
        Ok(out.to_owned())
    }

    /// A tenant's user certificate into `out` (`viola-ca issue-user`).
    pub fn issue_user(&self, tenant: &str, name: &str, out: &Path) -> Result<PathBuf> {
        run_ok(
            Command::new(bin("viola-ca"))
                .args(["issue-user", "--ca-dir"])
                .arg(&self.ca_dir)
                .args(["--tenant", tenant, "--name", name, "--out"])
                .arg(out),
        )?;
        Ok(out.to_owned())
    }

    /// Revokes every certificate issued to `identity` (`viola://ROLE/SITE/HOST`) with
    /// `viola-ca revoke`; returns the CRL it wrote.
    pub fn revoke(&self, identity: &str) -> Result<PathBuf> {
        run_ok(
            Command::new(bin("viola-ca"))
                .args(["revoke", "--ca-dir"])
                .arg(&self.ca_dir)
                .args(["--identity", identity]),
        )?;
        Ok(self.ca_dir.join("crl.pem"))
    }

    /// The CA's current revocation list, signed afresh (`viola-ca crl`); returns its path.
    pub fn crl(&self) -> Result<PathBuf> {
        let out = run_ok(
            Command::new(bin("viola-ca"))
                .args(["crl", "--ca-dir"])
                .arg(&self.ca_dir),
        )?;
        Ok(PathBuf::from(out.trim()))
    }

    /// Puts `crl` where a host's libvirt and QEMU read it below its PKI directory `pki`
    /// (`viola-ca install-crl --pki`).
    pub fn install_libvirt_crl(crl: &Path, pki: &Path) -> Result<String> {
        run_ok(
            Command::new(bin("viola-ca"))
                .arg("install-crl")
                .arg("--crl")
                .arg(crl)
                .arg("--pki")
                .arg(pki),
        )
    }

    /// Puts `crl` beside every identity directory below `etc` (`viola-ca install-crl`), as an
    /// administrator does on each host.
    pub fn install_crl(crl: &Path, etc: &Path) -> Result<String> {
        run_ok(
            Command::new(bin("viola-ca"))
                .arg("install-crl")
                .arg("--crl")
                .arg(crl)
                .arg("--etc")
                .arg(etc),
        )
    }
}
