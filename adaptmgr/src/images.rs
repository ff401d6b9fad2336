//! Images as a service: `viola image list` and `viola image import FILE --name N --site S`.
//!
//! - **Where images live.** In the sites' depots (content-addressed parts; a site fetches what
//!   it lacks from its peers when it stages a VM). The manager keeps no image catalogue of
//!   its own: a list asks every configured depot (`images`), so images imported with
//!   `viola-depot import` on a depot's machine are listed too.
//! - **Import.** The CLI sends the file's bytes after its request on the same stream; the
//!   manager relays them, as they come, to the site's depot (`upload`, a request only the
//!   manager's certificate may make), which inspects the untrusted file before anything opens
//!   it (self-contained qcow2 or raw only) and names it only once it is fully imported. The
//!   manager never holds the image: memory stays bounded by the streams' windows.
//! - **Tenants.** A tenant's image is stored under the depot name `_TENANT.NAME`
//!   ([`depot_name`]); the name travels with the image to every site, so ownership needs no
//!   table. A tenant sees and uses the federation's images (names not starting with `_`) and
//!   its own, under their short names; `vm create --image NAME` by a tenant takes its own
//!   image of that name if one exists, else the federation's. Names starting with `_` are
//!   reserved: a tenant cannot type another tenant's depot name.

use std::collections::BTreeMap;

use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use viola_api::manager::{ImageImport, ImageView, Response};
use viola_depot::api::ImageEntry;
use viola_depot::client::ClientError;

use crate::manager::Manager;
use crate::migration::depot_stage::{DepotSession, Upload};
use crate::tenants::Caller;

/// What begins the depot name of a tenant's image.
const TENANT_MARK: char = '_';

/// Why an image request failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image name {0:?}: 1 to 120 letters, digits, '.', '_' and '-', not starting with '_', '.' or '-'"
    )]
    BadName(String),
    #[error("no depot is configured for site {0:?}")]
    NoDepot(String),
    #[error("the depot of site {site}")]
    Depot {
        site: String,
        #[source]
        source: Box<ClientError>,
    },
}

/// Checks a name a user gives an image (short: without the tenant part).
pub fn check_image_name(name: &str) -> Result<(), ImageError> {
    let ok = (1..=120).contains(&name.len())
        && !name.starts_with([TENANT_MARK, '.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// The depot's name for image `name` of `tenant` (`None`: the federation's).
pub fn depot_name(tenant: Option<&str>, name: &str) -> String {
    match tenant {
        None => name.to_owned(),
        Some(t) => format!("{TENANT_MARK}{t}.{name}"),
    }
}

/// The tenant and short name of a depot name (`(None, name)` for the federation's).
pub fn owner_of(depot_name: &str) -> (Option<&str>, &str) {
    depot_name
        .strip_prefix(TENANT_MARK)
        .and_then(|rest| rest.split_once('.'))
        .map_or((None, depot_name), |(t, n)| (Some(t), n))
}

/// Merges the sites' lists into one view per image `caller` may see.
pub fn image_views(caller: &Caller, by_site: &BTreeMap<String, Vec<ImageEntry>>) -> Vec<ImageView> {
    let mut views: BTreeMap<String, ImageView> = BTreeMap::new();
    for (site, entries) in by_site {
        for e in entries {
            let (tenant, short) = owner_of(&e.name);
            if !caller.owns(tenant) && tenant.is_some() {
                continue;
            }
            let view = views.entry(e.name.clone()).or_insert_with(|| ImageView {
                // A tenant sees its own images under their short names; an administrator sees
                // the depot's names (and the tenant column).
                name: match caller {
                    Caller::Tenant(_) => short.to_owned(),
                    Caller::Admin => e.name.clone(),
                },
                tenant: tenant.map(str::to_owned),
                manifest: e.manifest.to_hex(),
                virtual_size: e.virtual_size,
                parts: e.parts,
                sites: Vec::new(),
                incomplete: Vec::new(),
            });
            if e.complete {
                view.sites.push(site.clone());
            } else {
                view.incomplete.push(site.clone());
            }
        }
    }
    let mut views: Vec<ImageView> = views.into_values().collect();
    views.sort_by(|a, b| (&a.name, &a.tenant).cmp(&(&b.name, &b.tenant)));
    views
}

impl ImageError {
    /// For `map_err`: what the depot of `site` said (or that it could not be reached).
    fn depot(site: &str) -> impl Fn(ClientError) -> Self + '_ {
        move |source| Self::Depot {
            site: site.to_owned(),
            source: Box::new(source),
        }
    }
}

impl Manager {
    async fn depot_session(&self, site: &str) -> Result<Box<dyn DepotSession>, ImageError> {
        let addr = self
            .depot_addr(site)
            .ok_or_else(|| ImageError::NoDepot(site.to_owned()))?;
        self.depot_link
            .connect(addr)
            .await
            .map_err(ImageError::depot(site))
    }

    /// Every configured depot's images, by site; a depot that does not answer is left out
    /// and named in `unreachable` (with why).
    async fn images_by_site(
        &self,
        sites: Option<&[String]>,
    ) -> (BTreeMap<String, Vec<ImageEntry>>, Vec<String>) {
        let mut by_site = BTreeMap::new();
        let mut unreachable = Vec::new();
        for depot in &self.cfg.depots {
            if sites.is_some_and(|s| !s.contains(&depot.site)) {
                continue;
            }
            let listed = match self.depot_session(&depot.site).await {
                Ok(session) => session
                    .images()
                    .await
                    .map_err(ImageError::depot(&depot.site)),
                Err(e) => Err(e),
            };
            match listed {
                Ok(entries) => {
                    by_site.insert(depot.site.clone(), entries);
                }
                Err(e) => unreachable.push(viola_common::errors::chain(&e)),
            }
        }
        (by_site, unreachable)
    }

    /// `viola image list`: what `caller` may use, over every site's depot. A depot that does
    /// not answer is said on `progress` (the list holds the others').
    pub async fn list_images(
        &self,
        caller: &Caller,
        progress: &mpsc::Sender<Response>,
    ) -> Vec<ImageView> {
        let (by_site, unreachable) = self.images_by_site(None).await;
        for why in unreachable {
            tracing::warn!(%why, "image list without a depot");
            let _ = progress.try_send(Response::Step {
                message: format!("left out: {why}"),
            });
        }
        image_views(caller, &by_site)
    }

    /// `viola image import`: relays `body` (exactly `req.size` bytes) to the site's depot as
    /// `caller`'s image; `progress` hears how far it is.
    pub async fn import_image(
        &self,
        caller: &Caller,
        req: ImageImport,
        body: &mut (dyn AsyncRead + Unpin + Send),
        progress: &mpsc::Sender<Response>,
    ) -> Result<ImageView, ImageError> {
        check_image_name(&req.name)?;
        let name = depot_name(caller.tenant(), &req.name);
        let session = self.depot_session(&req.site).await?;
        let say = |message: String| {
            tracing::info!(%message, image = %name, "image import");
            let _ = progress.try_send(Response::Step { message });
        };
        say(format!(
            "sending {:.1} MiB to the depot of site {}",
            req.size as f64 / 1048576.0,
            req.site
        ));
        let mut last_tenth = 0;
        let size = req.size.max(1);
        let mut on_sent = |sent: u64| {
            let tenth = sent * 10 / size;
            if tenth > last_tenth {
                last_tenth = tenth;
                let _ = progress.try_send(Response::Step {
                    message: format!("{}% sent", tenth * 10),
                });
            }
        };
        let report = session
            .upload(Upload {
                name: &name,
                size: req.size,
                replace: req.replace,
                body,
                progress: &mut on_sent,
            })
            .await
            .map_err(ImageError::depot(&req.site))?;
        say(format!(
            "imported at site {}: manifest {}, {} chunks ({} new, {} of zeros)",
            req.site, report.manifest, report.chunks, report.new_chunks, report.zero_chunks
        ));
        self.inventory
            .record(
                crate::manager::now_ms(),
                "image_imported",
                &name,
                serde_json::json!({
                    "site": req.site, "manifest": report.manifest.to_hex(),
                    "bytes": report.bytes_received, "tenant": caller.tenant(),
                }),
            )
            .ok();
        Ok(ImageView {
            name: match caller {
                Caller::Tenant(_) => req.name,
                Caller::Admin => name,
            },
            tenant: caller.tenant().map(str::to_owned),
            manifest: report.manifest.to_hex(),
            virtual_size: report.virtual_size,
            parts: report.parts,
            sites: vec![req.site],
            incomplete: Vec::new(),
        })
    }

    /// The depot name `vm create --image IMAGE` by `caller` means on a violin of `sites`: a
    /// tenant's own image of that name if a depot there has it, else the federation's; an
    /// administrator names depot images directly.
    pub(crate) async fn resolve_image(
        &self,
        caller: &Caller,
        image: &str,
        sites: &[String],
    ) -> Result<String, ImageError> {
        let Caller::Tenant(tenant) = caller else {
            return Ok(image.to_owned());
        };
        check_image_name(image)?;
        let own = depot_name(Some(tenant), image);
        let (by_site, _) = self.images_by_site(Some(sites)).await;
        let has_own = by_site.values().flatten().any(|e| e.name == own);
        Ok(if has_own { own } else { image.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viola_depot::hash::Hash;

    fn entry(name: &str, complete: bool) -> ImageEntry {
        ImageEntry {
            name: name.into(),
            manifest: Hash::of(name.as_bytes()),
            virtual_size: 1 << 30,
            bytes: 1 << 20,
            parts: 1,
            complete,
            problem: None,
        }
    }

    #[test]
    fn depot_names_carry_the_tenant_and_only_its_tenant_reads_them() {
        assert_eq!(depot_name(Some("physics"), "mpi"), "_physics.mpi");
        assert_eq!(depot_name(None, "debian-12.5"), "debian-12.5");
        assert_eq!(owner_of("_physics.mpi-2.1"), (Some("physics"), "mpi-2.1"));
        assert_eq!(owner_of("debian-12.5"), (None, "debian-12.5"));
        assert!(check_image_name("_chem.secret").is_err(), "reserved");
        assert!(check_image_name("../etc").is_err());
        assert!(check_image_name("mpi-4.1_x").is_ok());
    }

    #[test]
    fn a_tenant_lists_the_federations_images_and_its_own_an_admin_all() {
        let by_site = BTreeMap::from([
            (
                "a".to_owned(),
                vec![
                    entry("guest", true),
                    entry("_physics.mpi", true),
                    entry("_chem.secret", true),
                ],
            ),
            (
                "b".to_owned(),
                vec![entry("guest", true), entry("_physics.mpi", false)],
            ),
        ]);
        let physics = image_views(&Caller::Tenant("physics".into()), &by_site);
        let names: Vec<_> = physics.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["guest", "mpi"]);
        assert_eq!(physics[0].sites, ["a", "b"]);
        assert_eq!(
            (
                physics[1].sites.as_slice(),
                physics[1].incomplete.as_slice()
            ),
            (&["a".to_owned()][..], &["b".to_owned()][..])
        );
        assert_eq!(physics[1].tenant.as_deref(), Some("physics"));
        let admin = image_views(&Caller::Admin, &by_site);
        assert_eq!(admin.len(), 3);
        assert!(
            admin
                .iter()
                .any(|v| v.name == "_chem.secret" && v.tenant.as_deref() == Some("chem"))
        );
    }
}
