//! `viola-ca`: create the federation CA and issue daemon certificates.
//!
//! ```text
//! viola-ca init  --ca-dir /etc/viola/ca [--name fed] [--days 3650]
//! viola-ca issue --ca-dir /etc/viola/ca --role overlay --site a --host a1 --out /etc/viola/overlay
//! viola-ca issue-user --ca-dir /etc/viola/ca --tenant physics --name ann --out ~/.viola
//! viola-ca show  /etc/viola/overlay/cert.pem
//! viola-ca issue-libvirt --ca-dir /etc/viola/ca --site a --host a1 --address 198.18.1.11 --out /etc/pki
//! viola-ca enrol --ca-dir /etc/viola/ca --site a --host a1 --manager 192.0.2.10:7443 \
//!          --peer 192.0.2.12:4500 [--depot-peer a=ADDR --depot-peer b=ADDR] \
//!          [--libvirt-address 192.0.2.11] [--manager-address 192.0.2.11] --out a1.bundle
//! viola-ca install --bundle a1.bundle [--etc /etc/viola] [--pki /etc/pki] [--force]   # on the host
//! viola-ca revoke --ca-dir /etc/viola/ca --identity viola://overlay/a/a1   # or --cert FILE
//! viola-ca install-crl --crl crl.pem [--etc /etc/viola]                  # on every host
//! ```
//! Every certificate issued is noted in the CA directory's `issued.tsv`; `revoke` adds to
//! `revoked.tsv` and writes `crl.pem` (see `viola_common::identity::revocation`).
//! `issue` writes `cert.pem`, `key.pem` (0600) and `ca.pem` into `--out`. `issue-libvirt`
//! writes a host's libvirtd and QEMU certificates in the layout they expect below `--out`
//! (`CA/`, `libvirt/`, `qemu/`; see `viola_common::identity::libvirt`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use viola_common::enrol;
use viola_common::identity::libvirt::{self, LibvirtHost};
use viola_common::identity::{self, CertificateAuthority, PeerIdentity, Role, revocation};

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
        #[command(flatten)]
        to: Issuing,
        /// adaptmgr, cli, depot, etcd (a member of the replicated managers' etcd: give its
        /// --address), monitor, overlay or user (libvirt: use issue-libvirt; a user's
        /// certificate: issue-user).
        #[arg(long)]
        role: Role,
        #[command(flatten)]
        host: HostNames,
    },
    /// Issue a host's certificate for libvirtd and QEMU (TLS migrations), valid for server and
    /// client authentication, and write it below --out (a PKI directory such as /etc/pki) as
    /// CA/cacert.pem, libvirt/{server,client}cert.pem, libvirt/private/{server,client}key.pem and
    /// qemu/{ca-cert,server-cert,server-key,client-cert,client-key}.pem; existing files are
    /// replaced.
    IssueLibvirt {
        #[command(flatten)]
        to: Issuing,
        #[command(flatten)]
        host: HostNames,
    },
    /// Issue a tenant's user certificate (viola://user/TENANT/NAME) for the `viola` CLI: the
    /// manager lets it see and change only that tenant's violins and VMs, within the tenant's
    /// quotas (`[[tenants]]` in the manager's configuration). Writes cert.pem, key.pem, ca.pem.
    IssueUser {
        #[command(flatten)]
        to: Issuing,
        #[arg(long)]
        tenant: String,
        /// The user's name (a DNS label, like the tenant's).
        #[arg(long)]
        name: String,
    },
    /// Make a new host's enrolment bundle (one file, mode 0600): certificates for its overlay,
    /// monitor and own depot (its libvirt's with --libvirt-address, the manager's with
    /// --manager-address), the manager's address and peers, and the CA's current
    /// CRL; install it on the host with `viola-ca install`. Every certificate is noted in the
    /// CA's register, so `viola-ca revoke` finds it.
    Enrol {
        #[command(flatten)]
        to: Issuing,
        #[arg(long)]
        site: String,
        #[arg(long)]
        host: String,
        /// The manager's QUIC endpoint.
        #[arg(long)]
        manager: SocketAddr,
        /// Another host's overlay to start from (repeatable).
        #[arg(long = "peer")]
        peers: Vec<SocketAddr>,
        #[arg(long, default_value = "0.0.0.0:4500")]
        overlay_listen: SocketAddr,
        /// A depot the host's own depot fetches image parts from, SITE=ADDR: its site's depot
        /// (the host depot images are imported into) and other sites' (repeatable). The host's
        /// depot lays images down in this host's image directory only.
        #[arg(long = "depot-peer", value_parser = parse_depot_peer)]
        depot_peers: Vec<(String, SocketAddr)>,
        /// Also the host's libvirt and QEMU certificate (TLS migrations), naming this address
        /// that other hosts' migration URIs use (repeatable).
        #[arg(long = "libvirt-address")]
        libvirt_addresses: Vec<IpAddr>,
        /// A DNS name other hosts' migration URIs use for this host (repeatable).
        #[arg(long = "libvirt-dns-name")]
        libvirt_dns_names: Vec<String>,
        /// The host also runs the manager (the one --manager names): its certificate
        /// (viola://adaptmgr/SITE/HOST) names this address, one browsers reach the dashboard at
        /// (repeatable).
        #[arg(long = "manager-address")]
        manager_addresses: Vec<IpAddr>,
        /// A DNS name browsers reach the manager's dashboard by, likewise (repeatable).
        #[arg(long = "manager-dns-name")]
        manager_dns_names: Vec<String>,
        /// The machine runs only the manager, no VMs: the bundle holds the manager's
        /// certificate (give --manager-address or --manager-dns-name) and nothing of a host's.
        #[arg(long, conflicts_with_all = ["peers", "depot_peers", "libvirt_addresses", "libvirt_dns_names"])]
        manager_only: bool,
    },
    /// Install an enrolment bundle on its host: identities under --etc/ROLE/ (keys 0600, the
    /// CRL beside each), each daemon's configuration --etc/ROLE.toml unless it exists (--force:
    /// rewrite it), and the libvirt certificate below --pki. The manager's configuration is not
    /// written (the bundle does not know the federation's hosts); what to do instead is printed.
    Install {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long, default_value = "/etc/viola")]
        etc: PathBuf,
        /// Where libvirt and QEMU read their certificates and CRL (if the bundle has them).
        #[arg(long, default_value = "/etc/pki")]
        pki: PathBuf,
        #[arg(long)]
        force: bool,
        /// Then tell the running libvirtd to read its TLS files again (`virt-admin
        /// server-update-tls libvirtd`): renewed certificates without a restart.
        #[arg(long)]
        reload_libvirtd: bool,
    },
    /// Revoke every certificate issued to an identity (a host or user leaving the federation),
    /// or one certificate, and write a fresh CRL (--ca-dir/crl.pem). Distribute it with
    /// `viola-ca install-crl` on every host; daemons refuse the revoked peers from then on.
    Revoke {
        #[arg(long)]
        ca_dir: PathBuf,
        /// viola://ROLE/SITE/HOST: every certificate the CA's register has for it.
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        identity: Option<PeerIdentity>,
        /// One certificate (PEM), issued by this CA.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// How long the CRL stays valid (re-sign it with `viola-ca crl` before then).
        #[arg(long, default_value_t = 365)]
        crl_days: u32,
    },
    /// Re-sign the CRL (--ca-dir/crl.pem) with every certificate revoked so far; print its path.
    Crl {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        crl_days: u32,
    },
    /// On a host: put a CRL beside every daemon identity under --etc (ROLE/crl.pem; the
    /// default when neither --etc nor --pki is given is /etc/viola), and with --pki where
    /// libvirt and QEMU read it (CA/cacrl.pem, qemu/ca-crl.pem). Running daemons enforce it
    /// from their next handshake and drop connections of revoked peers.
    InstallCrl {
        #[arg(long)]
        crl: PathBuf,
        #[arg(long)]
        etc: Option<PathBuf>,
        /// The host's PKI directory of libvirt and QEMU (/etc/pki).
        #[arg(long)]
        pki: Option<PathBuf>,
        /// Then tell the running libvirtd to read its TLS files again (`virt-admin
        /// server-update-tls libvirtd`), so its listener refuses the revoked at once; without
        /// it, it reads the CRL only when it starts (with --pki).
        #[arg(long, requires = "pki")]
        reload_libvirtd: bool,
    },
    /// Print the identity (viola://ROLE/SITE/HOST) a certificate names.
    Show { cert: PathBuf },
}

/// The CA that issues, and where and for how long the certificates go.
#[derive(Args)]
struct Issuing {
    #[arg(long)]
    ca_dir: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 365)]
    days: u32,
}

impl Issuing {
    fn ca(&self) -> anyhow::Result<CertificateAuthority> {
        Ok(CertificateAuthority::load(&self.ca_dir)?)
    }

    /// Notes a certificate in the CA directory's register (`issued.tsv`), so that `revoke
    /// --identity` finds it.
    fn record(&self, cert_pem: &str) -> anyhow::Result<()> {
        revocation::Register::new(&self.ca_dir)
            .record_issued(cert_pem)
            .context("recording the certificate in the CA's register")?;
        Ok(())
    }
}

/// A host a certificate names, and the names it is reached by besides its host name.
#[derive(Args)]
struct HostNames {
    #[arg(long)]
    site: String,
    /// The host name (also a DNS name in a libvirt certificate).
    #[arg(long)]
    host: String,
    /// An address the host is reached at, written into the certificate (repeatable): for a
    /// daemon, where browsers reach it (the manager's dashboard); for libvirt, what other
    /// hosts' migration URIs name.
    #[arg(long = "address")]
    addresses: Vec<IpAddr>,
    /// A DNS name the host is reached by, likewise (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
}

/// The names a certificate is to carry; `None` when there are none (no such certificate).
fn names(addresses: Vec<IpAddr>, dns_names: Vec<String>) -> Option<enrol::Names> {
    (!addresses.is_empty() || !dns_names.is_empty()).then_some(enrol::Names {
        addresses,
        dns_names,
    })
}

fn parse_depot_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (site, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SITE=ADDR"))?;
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok((site.to_owned(), addr))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { ca_dir, name, days } => {
            let ca = CertificateAuthority::generate(&name, days)?;
            ca.save(&ca_dir)?;
            println!("created CA {name:?} in {}", ca_dir.display());
        }
        Command::Issue { to, role, host } => {
            if role == Role::Libvirt {
                // Its certificate needs the host's addresses and libvirt's file layout.
                anyhow::bail!("for libvirt certificates use `viola-ca issue-libvirt`");
            }
            let id = PeerIdentity::new(role, &host.site, &host.host)?;
            let issued =
                to.ca()?
                    .issue_with_names(&id, &host.addresses, &host.dns_names, to.days)?;
            to.record(&issued.cert_pem)?;
            issued.save(&to.out)?;
            println!("issued {id} -> {}", to.out.display());
        }
        Command::IssueUser { to, tenant, name } => {
            let id = PeerIdentity::new(Role::User, &tenant, &name)
                .context("tenant and user names are DNS labels")?;
            let issued = to.ca()?.issue(&id, to.days)?;
            to.record(&issued.cert_pem)?;
            issued.save(&to.out)?;
            println!("issued {id} (tenant {tenant}) -> {}", to.out.display());
        }
        Command::IssueLibvirt { to, host } => {
            let host = LibvirtHost {
                site: host.site,
                host: host.host,
                addresses: host.addresses,
                dns_names: host.dns_names,
            };
            let issued = to.ca()?.issue_libvirt(&host, to.days)?;
            to.record(&issued.cert_pem)?;
            libvirt::write_layout(&issued, &to.out)?;
            println!("issued {} -> {}", issued.identity, to.out.display());
        }
        Command::Enrol {
            to,
            site,
            host,
            manager,
            peers,
            overlay_listen,
            depot_peers,
            libvirt_addresses,
            libvirt_dns_names,
            manager_addresses,
            manager_dns_names,
            manager_only,
        } => {
            let ca = to.ca()?;
            let plan = enrol::HostPlan {
                site,
                host,
                manager,
                peers,
                overlay_listen,
                depot: enrol::DepotPlan { peers: depot_peers },
                libvirt: names(libvirt_addresses, libvirt_dns_names),
                manager_identity: names(manager_addresses, manager_dns_names),
                manager_only,
            };
            let crl_path = to.ca_dir.join(revocation::CRL_FILE);
            let crl = match std::fs::read_to_string(&crl_path) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).context(crl_path.display().to_string()),
            };
            let bundle = enrol::make_bundle(&ca, &plan, crl, to.days)?;
            bundle.record(&revocation::Register::new(&to.ca_dir))?;
            bundle.save(&to.out)?;
            println!(
                "enrolment bundle for {}/{} ({}) -> {}; on the host: viola-ca install --bundle FILE",
                plan.site,
                plan.host,
                bundle
                    .identities
                    .keys()
                    .cloned()
                    .chain(bundle.libvirt.as_ref().map(|_| "libvirt".to_owned()))
                    .collect::<Vec<_>>()
                    .join(", "),
                to.out.display()
            );
        }
        Command::Install {
            bundle,
            etc,
            pki,
            force,
            reload_libvirtd,
        } => {
            let b = enrol::Bundle::load(&bundle)?;
            for path in b.install(&etc, Some(&pki), force)? {
                println!("wrote {}", path.display());
            }
            if reload_libvirtd {
                libvirt::reload_libvirtd_tls()?;
                println!("libvirtd reads its TLS files again");
            }
            if let Some(step) = b.next_step(&etc) {
                println!("{step}");
            }
        }
        Command::Revoke {
            ca_dir,
            identity,
            cert,
            crl_days,
        } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let target = match (identity, cert) {
                (Some(id), _) => revocation::RevokeTarget::Identity(id),
                (None, Some(path)) => revocation::RevokeTarget::Certificate(
                    CertificateDer::from_pem_file(&path)
                        .with_context(|| format!("{}: no PEM certificate", path.display()))?,
                ),
                (None, None) => anyhow::bail!("name --identity or --cert"),
            };
            let register = revocation::Register::new(&ca_dir);
            let revoked = register.revoke(&ca, &target, crl_days)?;
            if revoked.is_empty() {
                println!("already revoked; CRL re-signed");
            }
            for e in &revoked {
                println!("revoked {} (serial {})", e.identity, e.serial);
            }
            println!(
                "CRL: {} ({} revoked in all); on each host: viola-ca install-crl --crl FILE",
                ca_dir.join(revocation::CRL_FILE).display(),
                register.revoked()?.len()
            );
        }
        Command::Crl { ca_dir, crl_days } => {
            let ca = CertificateAuthority::load(&ca_dir)?;
            let path = revocation::Register::new(&ca_dir).write_crl(&ca, crl_days)?;
            println!("{}", path.display());
        }
        Command::InstallCrl {
            crl,
            etc,
            pki,
            reload_libvirtd,
        } => {
            let text = std::fs::read_to_string(&crl)
                .with_context(|| format!("reading {}", crl.display()))?;
            // Refuse what is not this federation's CRL before it is installed anywhere.
            let der =
                rustls_pki_types::CertificateRevocationListDer::from_pem_slice(text.as_bytes())
                    .with_context(|| format!("{}: no PEM revocation list", crl.display()))?;
            let etc = etc.or_else(|| pki.is_none().then(|| "/etc/viola".into()));
            let mut written = Vec::new();
            if let Some(etc) = &etc {
                let first = written.len();
                for dir in std::fs::read_dir(etc)
                    .with_context(|| format!("reading {}", etc.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                {
                    if let Ok(ca) = CertificateDer::from_pem_file(dir.join("ca.pem")) {
                        revocation::revoked_serials(der.as_ref(), &ca)
                            .with_context(|| format!("checking it against {}", dir.display()))?;
                    }
                }
                written.extend(enrol::install_crl(&text, etc)?);
                if written.len() == first {
                    anyhow::bail!("no daemon identity (ROLE/cert.pem) under {}", etc.display());
                }
            }
            if let Some(pki) = &pki {
                written.extend(libvirt::write_crl(&text, pki)?);
            }
            for path in written {
                println!("wrote {}", path.display());
            }
            if reload_libvirtd {
                libvirt::reload_libvirtd_tls()?;
                println!("libvirtd reads its TLS files again");
            }
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
    viola_common::errors::exit_code("viola-ca", run(Cli::parse()))
}
