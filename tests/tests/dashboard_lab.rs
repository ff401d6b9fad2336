//! The manager's web dashboard in a real browser (lab test): Debian's headless Chromium, driven
//! over WebDriver by Debian's chromedriver, against the lab federation of `lifecycle_lab`
//! (two sites of two hosts, real daemons, a VM from the depot image) with the dashboard
//! forwarded to the machine's loopback as the demo does.
//!
//! - The browser authenticates with a client certificate from the federation CA, imported
//!   into its NSS database the way a user imports one; Chromium sends it by itself because
//!   `scripts/setup.sh` installs a policy (`AutoSelectCertificateForUrls`) for
//!   `https://127.0.0.1`. A client without a certificate, and a monitor's certificate, are
//!   refused.
//! - The administrator's page shows the sites and their four hosts, the violin, its VM and the
//!   VM's host; a migration started from the CLI appears in flight with its progress and then
//!   as finished, with the VM at its new host, without the page being reloaded (server-sent
//!   events); the plots show the hosts' CPU, each overlay link's traffic and where the VM ran.
//! - A tenant's page shows its own violins and VMs and nothing of the administrator's or
//!   another tenant's; its JSON answers hold no hosts, and its history only its own VMs' series.
//!
//! Screenshots of every page (and the violins page at a phone's width) are written to the
//! test's directory, and to `VIOLA_SCREENSHOTS` when that names a directory (`docs/dashboard`
//! holds the ones reviewed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use viola_labtests::daemons::{free_port, log_text, spawn_logged};
use viola_labtests::lifecycle::{Fed, FedSpec, HOSTS};
use viola_labtests::{assert_tools, lab_tests_enabled, names, run, run_ok, wait_until};

/// A WebDriver session of a Chromium whose NSS database holds one identity.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver with a home of its own, where `identity` (a directory with cert.pem,
    /// key.pem and ca.pem) is imported as a user imports a certificate, and the CA trusted.
    fn start(dir: &Path, name: &str, identity: &Path) -> Self {
        let home = dir.join(format!("browser-{name}"));
        let nssdb = home.join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).unwrap();
        let db = format!("sql:{}", nssdb.display());
        run_ok(Command::new("certutil").args(["-N", "-d", &db, "--empty-password"])).unwrap();
        let p12 = home.join("identity.p12");
        run_ok(
            Command::new("openssl")
                .args(["pkcs12", "-export", "-passout", "pass:", "-name", name])
                .arg("-inkey")
                .arg(identity.join("key.pem"))
                .arg("-in")
                .arg(identity.join("cert.pem"))
                .arg("-out")
                .arg(&p12),
        )
        .unwrap();
        run_ok(
            Command::new("pk12util")
                .args(["-d", &db, "-W", "", "-i"])
                .arg(&p12),
        )
        .unwrap();
        run_ok(
            Command::new("certutil")
                .args(["-A", "-d", &db, "-n", "viola-ca", "-t", "C,,", "-i"])
                .arg(identity.join("ca.pem")),
        )
        .unwrap();
        let port = free_port();
        let driver = spawn_logged(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .env("HOME", &home),
            &dir.join(format!("chromedriver-{name}.log")),
        )
        .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Self {
            driver,
            base,
            session: String::new(),
        };
        wait_until("chromedriver listens", Duration::from_secs(20), || {
            browser.call("GET", "/status", None).is_ok()
        })
        .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/lib/chromium/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", home.join("profile").display()),
                ]
            }
        }}});
        let created = browser
            .call("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| {
                panic!(
                    "new browser session: {e}\n{}",
                    log_text(&dir.join(format!("chromedriver-{name}.log")))
                )
            });
        browser.session = created["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// One WebDriver call (curl, bounded); the response's `value`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-m",
            "60",
            "-X",
            method,
            &format!("{}{path}", self.base),
        ])
        .args(["-H", "Content-Type: application/json"]);
        if let Some(body) = body {
            cmd.args(["--data-binary", &body.to_string()]);
        }
        let out = run(&mut cmd).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("curl {path}: {}", out.status));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        match v["value"].get("error") {
            Some(err) => Err(format!("{err}: {}", v["value"]["message"])),
            None => Ok(v["value"].clone()),
        }
    }

    fn session_call(&self, method: &str, what: &str, body: Option<&Value>) -> Value {
        self.call(method, &format!("/session/{}{what}", self.session), body)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn eval(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    /// The page's text for `selector` (all matches joined), empty when none.
    fn text(&self, selector: &str) -> String {
        self.eval(&format!(
            "return [...document.querySelectorAll({})].map(e => e.textContent).join('\\n');",
            json!(selector)
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    fn wait_for(&self, what: &str, timeout: Duration, check: impl FnMut(&Self) -> bool) {
        let mut check = check;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if check(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{what}: not within {timeout:?}; the page showed:\n{}",
            self.text("main")
        );
    }

    fn resize(&self, width: u32, height: u32) {
        self.session_call(
            "POST",
            "/window/rect",
            Some(&json!({ "width": width, "height": height })),
        );
    }

    /// A PNG of the page as it is now, into `dir` and `VIOLA_SCREENSHOTS` if set.
    fn screenshot(&self, dir: &Path, name: &str) {
        let b64 = self.session_call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("screenshot {name}: not base64"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot {name} is a PNG");
        let mut targets = vec![dir.join("screenshots")];
        if let Some(d) = std::env::var_os("VIOLA_SCREENSHOTS") {
            targets.push(PathBuf::from(d));
        }
        for t in targets {
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (what WebDriver's screenshots are), `None` on a character outside it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// `curl` of the dashboard's JSON API with the identity in `id` (or none): HTTP status and body;
/// status 0 when the TLS handshake failed.
fn api(url: &str, id: Option<&Path>, ca: &Path) -> (u32, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca);
    if let Some(id) = id {
        cmd.arg("--cert")
            .arg(id.join("cert.pem"))
            .arg("--key")
            .arg(id.join("key.pem"));
    }
    let out = run(cmd.arg(url)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The migration step the page shows for VM web, noted in `seen` when it is a new one.
fn note_step(page: &Browser, seen: &mut Vec<String>) -> String {
    let step = page.text("[data-migrating=\"web\"] .step");
    if !step.is_empty() && seen.last() != Some(&step) {
        seen.push(step.clone());
    }
    step
}

/// The violins page of user `name` (with `identity`) of `tenant`, once `shown` holds; none of
/// `others` (other tenants' and the administrator's violins and VMs) is on it.
fn tenant_page(
    dir: &Path,
    url: &str,
    name: &str,
    identity: &Path,
    tenant: &str,
    shown: impl FnMut(&Browser) -> bool,
    others: &[&str],
) -> Browser {
    let page = Browser::start(dir, name, identity);
    page.goto(&format!("{url}/#violins"));
    page.wait_for(
        &format!("tenant {tenant}'s page shows its violin"),
        Duration::from_secs(30),
        shown,
    );
    let text = page.text("main");
    for other in others {
        assert!(
            !text.contains(other),
            "tenant {tenant}'s page shows {other}:\n{text}"
        );
    }
    page
}

#[test]
fn the_dashboard_in_a_real_browser_shows_the_federation_a_live_migration_and_only_a_tenants_own_violins()
 {
    if !lab_tests_enabled() {
        return;
    }
    assert_tools(&["chromedriver", "certutil", "pk12util", "socat"]);
    let fed = Fed::with(&FedSpec {
        dashboard: true,
        ..FedSpec::default()
    });
    let url = fed.dashboard_url.clone().expect("dashboard url");
    let dir = fed.dir().to_owned();
    let mgr_log = fed.mgr_log.clone();
    let ca = fed.id("cli").join("ca.pem");
    let cli = &fed.cli;

    // Who may read it: not a client without a certificate, not a monitor.
    let (code, _) = api(&format!("{url}/api/v1/overview"), None, &ca);
    assert_eq!(code, 0, "no certificate: the TLS handshake is refused");
    let (code, body) = api(
        &format!("{url}/api/v1/overview"),
        Some(&fed.id("monitor-a1")),
        &ca,
    );
    assert_eq!(code, 403, "a monitor may not read the dashboard: {body}");

    // A violin and a VM of the administrator; a violin for each tenant.
    cli.json(&["violin", "create", "labnet", "--sites", "a,b"])
        .unwrap_or_else(|e| panic!("violin create: {e}\n{}", log_text(&mgr_log)));
    let ann = fed.user("ann");
    let bob = fed.user("bob");
    ann.json(&["violin", "create", "physnet", "--sites", "b"])
        .unwrap();
    bob.json(&["violin", "create", "chemnet", "--sites", "a"])
        .unwrap();
    let created = cli
        .vm_create(
            "web",
            "labnet",
            "guest",
            &["--host", "a1", "--ready-by", "180"],
        )
        .unwrap_or_else(|e| panic!("vm create: {e}\n{}", log_text(&mgr_log)));
    assert_eq!(created[0]["host"], "a1");
    bob.vm_create(
        "calc",
        "chemnet",
        "guest",
        &["--host", "a2", "--ready-by", "180"],
    )
    .unwrap_or_else(|e| panic!("vm create calc (tenant chem): {e}\n{}", log_text(&mgr_log)));

    // The tenant's API answer has its violin only and no hosts.
    let (code, body) = api(&format!("{url}/api/v1/overview"), Some(&fed.id("ann")), &ca);
    assert_eq!(code, 200, "{body}");
    let ann_view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        names(&ann_view["violins"]),
        ["physnet"],
        "tenant physics sees only its violin"
    );
    assert_eq!(ann_view["sites"], json!([]), "a tenant sees no hosts");
    assert_eq!(ann_view["viewer"]["tenant"], "physics");
    assert_eq!(
        ann_view["vms"],
        json!([]),
        "tenant physics has no VMs: {body}"
    );
    let (code, body) = api(
        &format!("{url}/api/v1/history?range=hour"),
        Some(&fed.id("bob")),
        &ca,
    );
    assert_eq!(code, 200, "{body}");
    let bob_history: Value = serde_json::from_str(&body).unwrap();
    let series = names(&bob_history["series"]);
    assert!(
        series.iter().all(|s| s.starts_with("vm/calc/")),
        "tenant chem's history holds its own VM's series only: {series:?}"
    );
    let (code, _) = api(
        &format!("{url}/api/v1/history?range=week"),
        Some(&fed.id("bob")),
        &ca,
    );
    assert_eq!(code, 400, "an unknown range is refused");

    // The administrator's page.
    let admin = Browser::start(&dir, "admin", &fed.id("cli"));
    admin.goto(&format!("{url}/#federation"));
    admin.wait_for(
        "the federation page shows the four hosts up",
        Duration::from_secs(30),
        |b| {
            let hosts =
                b.eval("return [...document.querySelectorAll('[data-host] .badge.up')].length;");
            hosts.as_u64() == Some(HOSTS.len() as u64)
        },
    );
    for h in HOSTS {
        assert!(
            admin.text(&format!("[data-host=\"{h}\"] h3")).contains(h),
            "host {h} shown"
        );
    }
    assert!(
        admin.text("#links").contains("a ↔ b"),
        "the WAN link a–b is listed"
    );
    admin.screenshot(&dir, "federation");

    admin.goto(&format!("{url}/#violins"));
    let vm_host = |b: &Browser| {
        b.eval(
            "const r = document.querySelector('[data-violin=\"labnet\"] tr[data-vm=\"web\"]'); \
             return r ? r.dataset.host : null;",
        )
        .as_str()
        .map(str::to_owned)
    };
    admin.wait_for(
        "violin labnet shows VM web at a1",
        Duration::from_secs(30),
        |b| vm_host(b).as_deref() == Some("a1"),
    );
    let shown = admin.text("#violin-list");
    for name in ["labnet", "physnet", "chemnet", "calc"] {
        assert!(shown.contains(name), "the administrator sees {name}");
    }
    admin.screenshot(&dir, "violins");

    // A migration from the CLI, watched on the page without reloading it.
    admin.eval("window.__notReloaded = true; return null;");
    admin.goto(&format!("{url}/#migrations"));
    admin.eval("window.__notReloaded = true; return null;");
    let mut migrate = cli.cmd(&["vm", "migrate", "web", "--to", "b1", "--timeout-s", "240"]);
    // Its output goes to a file: a pipe nobody reads while the page is watched could fill.
    let migrate_log = dir.join("migrate.log");
    let mut migration = spawn_logged(&mut migrate, &migrate_log).unwrap();
    let mut progress_seen = Vec::new();
    admin.wait_for(
        "the migration appears in flight with its progress",
        Duration::from_secs(60),
        |b| {
            let step = note_step(b, &mut progress_seen);
            b.text("[data-migrating=\"web\"]").contains("a1 → b1") && step.contains('%')
        },
    );
    admin.screenshot(&dir, "migration-in-flight");
    // What the page shows while the CLI's migration runs.
    while migration.try_wait().unwrap().is_none() {
        note_step(&admin, &mut progress_seen);
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = migration.wait().unwrap();
    assert!(status.success(), "migrate: {}", log_text(&migrate_log));
    admin.wait_for(
        "the finished migration is listed and nothing is in flight",
        Duration::from_secs(20),
        |b| {
            note_step(b, &mut progress_seen);
            b.text("tr[data-migration=\"web\"]").contains("migrated")
                && b.text("[data-migrating=\"web\"]").is_empty()
        },
    );
    let row = admin.text("tr[data-migration=\"web\"]");
    assert!(row.contains("a1 → b1"), "{row}");
    assert!(
        row.contains("operator"),
        "a CLI migration is the operator's: {row}"
    );
    eprintln!("progress the page showed: {progress_seen:?}; finished row: {row}");
    assert_eq!(
        admin.eval("return window.__notReloaded === true;"),
        Value::Bool(true),
        "the page was updated in place, not reloaded"
    );
    admin.screenshot(&dir, "migrations");
    admin.goto(&format!("{url}/#violins"));
    admin.wait_for("VM web shown at b1", Duration::from_secs(20), |b| {
        vm_host(b).as_deref() == Some("b1")
    });

    admin.goto(&format!("{url}/#plots"));
    admin.wait_for(
        "the plots draw the hosts' CPU, the overlay links' traffic and the VM's move",
        Duration::from_secs(30),
        |b| {
            b.eval(
                "return !!document.querySelector('[data-chart=\"Host CPU\"] svg path') && \
                 !!document.querySelector('[data-chart=\"Overlay traffic per peer link (sent)\"] svg path') && \
                 !!document.querySelector('rect[data-vm=\"web\"][data-host=\"b1\"]') && \
                 !!document.querySelector('rect[data-vm=\"web\"][data-host=\"a1\"]');",
            ) == Value::Bool(true)
        },
    );
    // Every plot in one picture: a window as tall as the page.
    admin.resize(1280, 2700);
    admin.screenshot(&dir, "plots");
    admin.resize(1280, 900);
    admin.goto(&format!("{url}/#decisions"));
    admin.wait_for("the decisions page", Duration::from_secs(10), |b| {
        !b.text("#decision-list").is_empty()
    });
    admin.screenshot(&dir, "decisions");
    admin.resize(390, 844);
    admin.goto(&format!("{url}/#violins"));
    admin.wait_for(
        "the violins page at a phone's width",
        Duration::from_secs(10),
        |b| vm_host(b).is_some(),
    );
    let overflow = admin.eval(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
    );
    assert!(
        overflow.as_i64().is_some_and(|o| o <= 0),
        "no sideways scrolling at 390 px: {overflow}"
    );
    admin.screenshot(&dir, "violins-phone");
    drop(admin);

    // The tenant's page: its violin only; no federation or decisions pages.
    let tenant = tenant_page(
        &dir,
        &url,
        "ann",
        &fed.id("ann"),
        "physics",
        |b| b.text("[data-violin] h3").contains("physnet"),
        &["labnet", "chemnet", "web", "calc"],
    );
    assert!(tenant.text("#who").contains("tenant physics"));
    assert_eq!(
        tenant.eval("return document.querySelector('nav a[data-tab=\"federation\"]').hidden;"),
        Value::Bool(true),
        "no federation page for a tenant"
    );
    tenant.screenshot(&dir, "tenant-violins");
    drop(tenant);
    let chem = tenant_page(
        &dir,
        &url,
        "bob",
        &fed.id("bob"),
        "chem",
        |b| {
            b.text("[data-violin=\"chemnet\"] tr[data-vm=\"calc\"]")
                .contains("a2")
        },
        &["labnet", "physnet", "web"],
    );
    chem.screenshot(&dir, "tenant-chem-violins");
    drop(chem);

    eprintln!("screenshots in {}", dir.join("screenshots").display());
    // Keep the test's directory when asked, to look at the screenshots.
    if std::env::var_os("VIOLA_KEEP_LAB").is_some() {
        let _ = fed.tmp.keep();
    }
}

#[test]
fn screenshots_decode_from_base64() {
    // The PNG signature, as WebDriver sends the start of every screenshot.
    assert_eq!(base64_decode("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
    assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
    assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
    assert!(base64_decode("T*E=").is_none());
}
