//! `viola-ca`: create the federation CA and issue daemon certificates.
//!
//! ```text
//! viola-ca init  --ca-dir /etc/viola/ca [--name fed] [--days 3650]
//! viola-ca issue --ca-dir /etc/viola/ca --role overlay --site a --host a1 --out /etc/viola/overlay
//! viola-ca show  /etc/viola/overlay/cert.pem
//! ```
//! `issue` writes `cert.pem`, `key.pem` (0600) and `ca.pem` into `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use viola_common::identity::{self, CertificateAuthority, PeerIdentity, Role};

#[derive(Parser)]
#[command(about = "Viola federation CA: create it, issue daemon certificates")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new CA (ca.pem, ca.key) in --ca-dir; refuses to overwrite.
    Init {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Federation name, shown in the CA's subject.
        #[arg(long, default_value = "viola")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate naming ROLE, SITE and HOST; writes cert.pem, key.pem, ca.pem to --out.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// adaptmgr, cli, depot, monitor or overlay.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        site: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print the identity (viola://ROLE/SITE/HOST) a certificate names.
    Show { cert: PathBuf },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { ca_dir, name, days } => {
            let ca = CertificateAuthority::generate(&name, days)?;
            ca.save(&ca_dir)?;
            println!("created CA {name:?} in {}", ca_dir.display());
        }
        Command::Issue {
            ca_dir,
            role,
            site,
            host,
            out,
            days,
        } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let id = PeerIdentity::new(role, &site, &host)?;
            ca.issue(&id, days)?.save(&out)?;
            println!("issued {id} -> {}", out.display());
        }
        Command::Show { cert } => {
            let der = CertificateDer::from_pem_file(&cert)
                .with_context(|| format!("{}: no PEM certificate", cert.display()))?;
            let id = identity::identity_of(&der)?;
            println!("{id}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viola-ca: {}", viola_common::errors::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
