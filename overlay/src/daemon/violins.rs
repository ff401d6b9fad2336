//! The violins of this host: those of the TOML file, made at start, and those the control
//! plane sets and removes at run time (`set_violin`, `remove_violin`), kept in the state file
//! (`state_file`) and made again at the next start. The TOML file stays authoritative: its
//! violins cannot be changed or removed by control requests, and a kept violin whose id is
//! now in the TOML file is dropped at start.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use viola_api::overlay::ViolinSpec;

use super::net::{self, Bridges, ViolinTap};
use super::{Ctx, DaemonError, switching};
use crate::config::OverlayConfig;
use crate::spec::{self, KeptViolin};
use crate::switch::Switch;
use crate::wire::ViolinId;

/// Where a violin comes from.
pub(super) enum Origin {
    /// The TOML file.
    Config,
    /// A control request (`set_violin`), as it was sent.
    Runtime(ViolinSpec),
}

/// A violin this host is a member of.
pub(super) struct Member {
    pub(super) origin: Origin,
    pub(super) bridge: String,
    /// The daemon made the bridge: a run-time violin's goes with it.
    pub(super) bridge_made: bool,
}

/// A TAP reader task and how to stop it.
pub(super) struct Reader {
    token: CancellationToken,
    task: JoinHandle<()>,
}

/// The bridge and TAP names of a run-time violin.
fn names(id: ViolinId) -> (String, String) {
    (format!("vio{id}"), format!("vio{id}t"))
}

/// What [`setup`] made.
pub(super) struct Setup {
    /// Bridges of TOML violins made here, removed when dropped.
    pub(super) bridges: Bridges,
    pub(super) taps: HashMap<ViolinId, ViolinTap>,
    pub(super) members: BTreeMap<ViolinId, Member>,
}

/// Makes the TOML file's violins, then the state file's: their bridges and TAPs, and their
/// places in `switch`. Every spec is checked as a control request's would be.
pub(super) fn setup(cfg: &OverlayConfig, switch: &mut Switch) -> Result<Setup, DaemonError> {
    let mut made = Setup {
        bridges: Bridges::new(),
        taps: Default::default(),
        members: BTreeMap::new(),
    };
    // No peer is up yet, so adding violins asks for nothing to be sent.
    let mut out = Vec::new();
    for v in &cfg.violins {
        let vcfg = spec::violin_config(&v.spec())
            .map_err(|e| DaemonError::Config(format!("violin {}: {e}", v.id)))?;
        if made.members.contains_key(&vcfg.id) {
            return Err(DaemonError::Config(format!("violin {} listed twice", v.id)));
        }
        let (bridge, tap_name) = (v.bridge_name(), v.tap_name());
        let (tap, bridge_made) = net::violin_devices(&bridge, &tap_name, cfg.mtu, cfg.tap_offload)?;
        if bridge_made {
            made.bridges.push(bridge.clone());
        }
        info!(violin = v.id, %bridge, tap = %tap_name, "violin up (configured)");
        made.taps.insert(vcfg.id, ViolinTap::new(tap, cfg.mtu));
        made.members.insert(
            vcfg.id,
            Member {
                origin: Origin::Config,
                bridge,
                bridge_made,
            },
        );
        switch.add_violin(vcfg, &mut out);
    }
    let Some(path) = &cfg.state_file else {
        return Ok(made);
    };
    let kept = spec::load_state(path).map_err(|e| DaemonError::Config(error_chain(&e)))?;
    for k in kept {
        let vcfg = spec::violin_config(&k.spec).map_err(|e| {
            DaemonError::Config(format!(
                "state file {}: violin {}: {e}",
                path.display(),
                k.spec.id
            ))
        })?;
        if made.members.contains_key(&vcfg.id) {
            warn!(
                violin = k.spec.id,
                "a kept violin is now in the TOML file; the TOML's stands"
            );
            continue;
        }
        let (bridge, tap_name) = names(vcfg.id);
        if made.members.values().any(|m| m.bridge == bridge) {
            return Err(DaemonError::Config(format!(
                "state file {}: violin {}: bridge {bridge} belongs to a configured violin",
                path.display(),
                k.spec.id
            )));
        }
        let mtu = spec::violin_mtu(&k.spec, cfg.mtu);
        let (tap, made_now) = net::violin_devices(&bridge, &tap_name, mtu, cfg.tap_offload)?;
        info!(violin = k.spec.id, %bridge, tap = %tap_name, mtu, "violin up (kept from the state file)");
        made.taps.insert(vcfg.id, ViolinTap::new(tap, mtu));
        made.members.insert(
            vcfg.id,
            Member {
                origin: Origin::Runtime(k.spec),
                bridge,
                bridge_made: k.bridge_made || made_now,
            },
        );
        switch.add_violin(vcfg, &mut out);
    }
    Ok(made)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Starts the TAP reader of `violin` (stopped by [`remove`] or the daemon's shutdown).
pub(super) fn start_reader(ctx: &Rc<Ctx>, violin: ViolinId) {
    let token = ctx.token.child_token();
    let task = tokio::task::spawn_local(switching::tap_reader(ctx.clone(), violin, token.clone()));
    ctx.state
        .borrow_mut()
        .readers
        .insert(violin, Reader { token, task });
}

/// Waits for every TAP reader to end (the daemon's token is cancelled).
pub(super) async fn stop_readers(ctx: &Ctx) {
    let readers: Vec<Reader> = std::mem::take(&mut ctx.state.borrow_mut().readers)
        .into_values()
        .collect();
    for r in readers {
        r.token.cancel();
        let _ = r.task.await;
    }
}

/// At shutdown: the bridges made for run-time violins go too, unless a state file brings the
/// violins back at the next start (then the guests' ports stay attached meanwhile).
pub(super) fn shutdown(ctx: &Ctx) {
    if ctx.state_file.is_some() {
        return;
    }
    let st = ctx.state.borrow();
    for m in st.members.values() {
        if matches!(m.origin, Origin::Runtime(_)) && m.bridge_made {
            net::remove_bridge(&m.bridge);
        }
    }
}

/// The run-time violins as the state file keeps them, `change` applied.
fn kept(
    members: &BTreeMap<ViolinId, Member>,
    change: Option<(ViolinId, Option<KeptViolin>)>,
) -> Vec<KeptViolin> {
    let mut kept: BTreeMap<ViolinId, KeptViolin> = members
        .iter()
        .filter_map(|(id, m)| match &m.origin {
            Origin::Runtime(spec) => Some((
                *id,
                KeptViolin {
                    spec: spec.clone(),
                    bridge_made: m.bridge_made,
                },
            )),
            Origin::Config => None,
        })
        .collect();
    if let Some((id, k)) = change {
        match k {
            Some(k) => kept.insert(id, k),
            None => kept.remove(&id),
        };
    }
    kept.into_values().collect()
}

/// Writes the state file (if any) as it will be after `change`.
fn persist(
    ctx: &Ctx,
    members: &BTreeMap<ViolinId, Member>,
    change: (ViolinId, Option<KeptViolin>),
) -> Result<(), String> {
    let Some(path) = &ctx.state_file else {
        return Ok(());
    };
    spec::save_state(path, &kept(members, Some(change))).map_err(|e| error_chain(&e))
}

fn configured(id: ViolinId) -> String {
    format!("violin {id} is configured in the TOML file; change it there")
}

/// `set_violin`: makes this host a member of the violin, or replaces its settings in place.
/// Refused, with nothing changed, if the spec is bad, the violin is the TOML file's, its
/// devices cannot be made or the state file cannot be written.
pub(super) fn set(ctx: &Rc<Ctx>, spec: ViolinSpec) -> Result<(), String> {
    let vcfg = spec::violin_config(&spec).map_err(|e| e.to_string())?;
    let id = vcfg.id;
    let mut guard = ctx.state.borrow_mut();
    let st = &mut *guard;
    match st.members.get(&id) {
        Some(Member {
            origin: Origin::Config,
            ..
        }) => return Err(configured(id)),
        Some(m) => {
            if matches!(&m.origin, Origin::Runtime(old) if *old == spec) {
                return Ok(());
            }
            let mtu = spec::violin_mtu(&spec, ctx.mtu);
            let old_mtu = match &m.origin {
                Origin::Runtime(old) => spec::violin_mtu(old, ctx.mtu),
                Origin::Config => ctx.mtu,
            };
            if mtu != old_mtu {
                net::set_mtu(&m.bridge, &names(id).1, mtu).map_err(|e| error_chain(&e))?;
                info!(violin = %id, mtu, "violin MTU changed");
            }
            let k = KeptViolin {
                spec: spec.clone(),
                bridge_made: m.bridge_made,
            };
            if let Err(e) = persist(ctx, &st.members, (id, Some(k))) {
                if mtu != old_mtu {
                    let _ = net::set_mtu(&m.bridge, &names(id).1, old_mtu);
                }
                return Err(e);
            }
            if let Some(t) = st.taps.get_mut(&id) {
                t.set_mtu(mtu);
            }
            st.switch.add_violin(vcfg, &mut st.out);
            st.execute();
            if let Some(m) = st.members.get_mut(&id) {
                m.origin = Origin::Runtime(spec);
            }
            info!(violin = %id, "violin updated");
            return Ok(());
        }
        None => {}
    }
    let (bridge, tap_name) = names(id);
    if st.members.values().any(|m| m.bridge == bridge) {
        return Err(format!("bridge {bridge} belongs to a configured violin"));
    }
    let mtu = spec::violin_mtu(&spec, ctx.mtu);
    let (tap, bridge_made) = net::violin_devices(&bridge, &tap_name, mtu, ctx.tap_offload)
        .map_err(|e| error_chain(&e))?;
    let k = KeptViolin {
        spec: spec.clone(),
        bridge_made,
    };
    if let Err(e) = persist(ctx, &st.members, (id, Some(k))) {
        drop(tap);
        if bridge_made {
            net::remove_bridge(&bridge);
        }
        return Err(e);
    }
    st.taps.insert(id, ViolinTap::new(tap, mtu));
    st.members.insert(
        id,
        Member {
            origin: Origin::Runtime(spec),
            bridge: bridge.clone(),
            bridge_made,
        },
    );
    st.switch.add_violin(vcfg, &mut st.out);
    st.execute();
    drop(guard);
    start_reader(ctx, id);
    info!(violin = %id, %bridge, tap = %tap_name, mtu, "violin up (set by a control request)");
    Ok(())
}

/// `remove_violin`: takes this host out of a run-time violin: its TAP reader stops, the switch
/// leaves it (telling the peers), its TAP closes (and with it goes) and its bridge is removed
/// if the daemon made it. A violin this host is not a member of is removed already.
pub(super) async fn remove(ctx: &Ctx, id: u32) -> Result<(), String> {
    let id = ViolinId::new(id).ok_or_else(|| format!("violin id {id} exceeds 24 bits"))?;
    let (reader, member) = {
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        match st.members.get(&id) {
            None => return Ok(()),
            Some(Member {
                origin: Origin::Config,
                ..
            }) => return Err(configured(id)),
            Some(_) => {}
        }
        persist(ctx, &st.members, (id, None))?;
        st.switch.remove_violin(id, &mut st.out);
        st.execute();
        st.taps.remove(&id);
        (st.readers.remove(&id), st.members.remove(&id))
    };
    // The reader holds the TAP until it ends; then its file closes and the kernel deletes it.
    if let Some(r) = reader {
        r.token.cancel();
        let _ = r.task.await;
    }
    if let Some(m) = member
        && m.bridge_made
    {
        net::remove_bridge(&m.bridge);
    }
    info!(violin = %id, "violin removed");
    Ok(())
}

/// Whether `id` was set at run time (for the status).
pub(super) fn is_runtime(members: &BTreeMap<ViolinId, Member>, id: u32) -> bool {
    ViolinId::new(id)
        .and_then(|id| members.get(&id))
        .is_some_and(|m| matches!(m.origin, Origin::Runtime(_)))
}
