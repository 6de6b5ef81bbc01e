//! The `rapport` binary: database creation, operators' commands, start-up failures and
//! graceful shutdown on SIGTERM.

use crate::common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestDb;

fn rapport(db_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rapport"));
    cmd.env("DATABASE_URL", db_url)
        .env_remove("RAPPORT_DATABASE_URL")
        .env_remove("RAPPORT_ADMIN_TOKEN")
        .env(
            "RAPPORT_CONFIG",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
        );
    cmd
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run rapport");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_creates_a_missing_database_and_is_repeatable() {
    let db = TestDb::unborn();
    let (ok, out, err) = run(rapport(&db.url).arg("migrate"));
    assert!(ok, "{err}");
    assert!(out.contains("migrations applied"));
    let (ok, _, err) = run(rapport(&db.url).arg("migrate"));
    assert!(ok, "second run: {err}");
}

#[test]
fn operators_manage_tenants_and_keys_from_the_command_line() {
    let db = TestDb::unborn();
    let (ok, out, err) = run(rapport(&db.url).args([
        "tenant",
        "create",
        "--name",
        "Acme Credit",
        "--default-country",
        "HR",
        "--default-locale",
        "hr",
        "--timezone",
        "Europe/Zagreb",
    ]));
    assert!(ok, "{err}");
    let tenant: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(tenant["slug"], "acme-credit");

    let (ok, out, err) = run(rapport(&db.url).args([
        "api-key",
        "create",
        "--tenant",
        "acme-credit",
        "--name",
        "shop",
    ]));
    assert!(ok, "{err}");
    let key: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(key["key"].as_str().unwrap().starts_with("rk_live_"));
    let key_id = key["id"].as_str().unwrap();

    let (ok, out, _) = run(rapport(&db.url).args([
        "api-key",
        "list",
        "--tenant",
        tenant["id"].as_str().unwrap(),
    ]));
    assert!(ok);
    assert!(out.contains(key_id));
    assert!(!out.contains(key["key"].as_str().unwrap()));

    let (ok, out, _) = run(rapport(&db.url).args(["tenant", "list"]));
    assert!(ok);
    assert_eq!(out.lines().count(), 1);

    let (ok, _, err) =
        run(rapport(&db.url).args(["api-key", "revoke", "--tenant", "acme-credit", key_id]));
    assert!(ok, "{err}");
    let (ok, out, _) = run(rapport(&db.url).args(["api-key", "list", "--tenant", "acme-credit"]));
    assert!(ok);
    assert!(out.contains("\"revoked_at\":\"20"));

    // Mistakes are one clear line and a failing exit code.
    let (ok, _, err) =
        run(rapport(&db.url).args(["tenant", "create", "--name", "X", "--default-country", "XX"]));
    assert!(!ok);
    assert!(err.starts_with("error: --default-country:"), "{err}");
    let (ok, _, err) =
        run(rapport(&db.url).args(["api-key", "create", "--tenant", "nope", "--name", "x"]));
    assert!(!ok);
    assert!(err.contains("no tenant with id or slug `nope`"), "{err}");
}

#[test]
fn operators_import_contacts_from_a_file_with_a_summary() {
    let db = TestDb::unborn();
    let (ok, _, err) = run(rapport(&db.url).args([
        "tenant",
        "create",
        "--name",
        "Acme Credit",
        "--default-country",
        "SI",
    ]));
    assert!(ok, "{err}");
    let dir = std::env::temp_dir().join(format!("rapport-cli-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stranke.csv");
    let mut csv = String::from("external_id;Tel;first_name;Opomba\n");
    for n in 0..2500 {
        csv.push_str(&format!(
            "s{n};041 {:03} {:03};Špela;x\n",
            n / 1000,
            n % 1000
        ));
    }
    csv.push_str("s-bad;12;Nina;x\n");
    std::fs::write(&file, csv).unwrap();
    let (ok, out, err) = run(rapport(&db.url)
        .args(["import", "contacts", "--tenant", "acme-credit"])
        .arg(&file)
        .args(["--map", "Tel=phone", "--map", "Opomba="]));
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["filename"], "stranke.csv");
    assert_eq!(summary["created"], 2500, "{summary}");
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["errors"][0]["line"], 2502);
    assert_eq!(summary["errors"][0]["field"], "phone");
    // Mistakes in the file are one clear line, and nothing is kept.
    std::fs::write(&file, "Tel\n041 000 000\n").unwrap();
    let (ok, _, err) = run(rapport(&db.url)
        .args(["import", "contacts", "--tenant", "acme-credit"])
        .arg(&file));
    assert!(!ok);
    assert!(err.starts_with("error: header: column 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_database_is_one_clear_line_without_the_password() {
    let (ok, _, err) = run(rapport("postgres://app:s3cret@127.0.0.1:1/rapport").arg("migrate"));
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: cannot connect to the database at postgres://app:****@127.0.0.1:1/rapport"
        ),
        "{err}"
    );
    assert!(!err.contains("s3cret"));
}

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_answers_and_stops_cleanly_on_sigterm() {
    let db = TestDb::unborn();
    let common::Listening {
        mut child,
        addr,
        mut lines,
        rest: rx,
    } = common::spawn_listening(
        rapport(&db.url)
            .arg("serve")
            .env("RAPPORT_LISTEN", "127.0.0.1:0")
            .env("RAPPORT_LOG_FORMAT", "json"),
        Duration::from_secs(60),
    );
    assert!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "log lines are JSON: {lines:#?}"
    );
    let health = http_get(&addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(line);
    }
    assert!(
        lines.iter().any(|l| l.contains("shutdown requested")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"stopped\"")),
        "{lines:#?}"
    );
}

/// With no database configured, `serve` starts a private PostgreSQL from the installed server
/// binaries (data under `var/pgdata`, a Unix socket there), says so, lets other commands use
/// it while it runs, and stops it on shutdown.
#[test]
fn serve_without_a_database_starts_and_stops_a_private_postgresql() {
    let Some(_) = rapport::embedded_pg::find_binaries() else {
        eprintln!("skipped: no PostgreSQL server binaries on this machine");
        return;
    };
    let dir = std::env::temp_dir().join(format!("rapport-embedded-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let command = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rapport"));
        cmd.args(args)
            .current_dir(&dir)
            .env_remove("DATABASE_URL")
            .env_remove("RAPPORT_DATABASE_URL")
            // The machine's own PostgreSQL answers on the default address: ask for the
            // private one as if it did not.
            .env("RAPPORT_EMBEDDED_POSTGRES", "always")
            .env(
                "RAPPORT_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"),
            );
        cmd
    };
    let common::Listening {
        mut child,
        addr,
        lines,
        ..
    } = common::spawn_listening(
        command(&["serve"])
            .env("RAPPORT_LISTEN", "127.0.0.1:0")
            .env("RAPPORT_LOG_FORMAT", "json"),
        Duration::from_secs(120),
    );
    assert!(
        lines.iter().any(|l| l.contains("started a private")),
        "{lines:#?}"
    );
    let ready = http_get(&addr, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // Another command finds the running one.
    let (ok, out, err) = run(&mut command(&[
        "tenant",
        "create",
        "--name",
        "Try",
        "--default-country",
        "HR",
    ]));
    assert!(ok, "{err}");
    assert!(out.contains("\"slug\": \"try\""), "{out}");
    let pid_file = dir.join("var/pgdata/postmaster.pid");
    assert!(pid_file.exists());

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(!pid_file.exists(), "the private PostgreSQL is stopped");
    let _ = std::fs::remove_dir_all(&dir);
}
