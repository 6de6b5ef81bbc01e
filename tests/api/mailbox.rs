//! Email in through a real IMAP mailbox (Dovecot, from Debian's packages: `.ci/run` installs
//! it), the ticket's signed reply address, attachments, and replies to closed tickets.

use crate::common;

use std::time::Duration;

use async_imap::Session;
use axum::http::StatusCode;
use base64::Engine;
use common::{TestApp, TestTenant};
use futures::TryStreamExt;
use rapport::domain::TenantId;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// A private Dovecot: its own configuration, users and mail in a temporary folder, IMAP on a
/// free port of 127.0.0.1. Stopped when dropped.
pub struct Dovecot {
    pub port: u16,
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        // SIGTERM: the master stops its login, auth and imap processes too.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dovecot_binary() -> Option<std::path::PathBuf> {
    ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

impl Dovecot {
    /// None (the test is skipped) where Dovecot is not installed, except in CI.
    pub fn start(users: &[(&str, &str)]) -> Option<Dovecot> {
        let Some(bin) = dovecot_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs Dovecot for the IMAP tests (.ci/run installs Debian's dovecot-imapd)"
            );
            eprintln!("skipped: no dovecot (apt-get install dovecot-imapd)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("rapport-dovecot-{}", uuid::Uuid::now_v7()));
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.join("mail"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        // As root, the mail processes run as Debian's unprivileged `dovenull` (Dovecot never
        // reads mail as root); as anyone else, as themselves.
        let root = unsafe { libc::geteuid() } == 0;
        let me = if root {
            None
        } else {
            Some(
                String::from_utf8(
                    std::process::Command::new("id")
                        .arg("-un")
                        .output()
                        .unwrap()
                        .stdout,
                )
                .unwrap()
                .trim()
                .to_owned(),
            )
        };
        let (mail_user, login_user, internal_user) = match &me {
            Some(me) => (me.clone(), me.clone(), me.clone()),
            None => (
                "dovenull".to_owned(),
                "dovenull".to_owned(),
                "dovecot".to_owned(),
            ),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let passwd: String = users
            .iter()
            .map(|(u, p)| format!("{u}:{{PLAIN}}{p}\n"))
            .collect();
        std::fs::write(dir.join("passwd"), passwd).unwrap();
        std::fs::set_permissions(dir.join("passwd"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let conf = format!(
            "base_dir = {d}/run\nstate_dir = {d}/state\nlog_path = {d}/dovecot.log\n\
             protocols = imap\nlisten = 127.0.0.1\nssl = no\ndisable_plaintext_auth = no\n\
             auth_mechanisms = plain login\ndefault_login_user = {login_user}\n\
             default_internal_user = {internal_user}\nfirst_valid_uid = 1\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid={mail_user} gid={mail_user} home={d}/mail/%u\n}}\n\
             mail_location = maildir:~/Maildir\n\
             service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  \
             inet_listener imaps {{\n    port = 0\n  }}\n  chroot =\n}}\n\
             service anvil {{\n  chroot =\n}}\n\
             service stats {{\n  unix_listener stats-reader {{\n    user = {internal_user}\n  }}\n  \
             unix_listener stats-writer {{\n    user = {internal_user}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let child = std::process::Command::new(bin)
            .args(["-F", "-c"])
            .arg(dir.join("dovecot.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start dovecot");
        let server = Dovecot { port, dir, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "dovecot did not listen: {}",
                std::fs::read_to_string(server.dir.join("dovecot.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// A session as a mail client: to put mail in and look at flags.
    pub async fn login(&self, user: &str, password: &str) -> Session<TcpStream> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.unwrap();
        client
            .login(user, password)
            .await
            .map_err(|(e, _)| e)
            .expect("log in")
    }
}

async fn append(session: &mut Session<TcpStream>, folder: &str, raw: &[u8]) {
    session
        .append(folder, None, None, raw)
        .await
        .expect("APPEND");
}

async fn unseen(session: &mut Session<TcpStream>, folder: &str) -> usize {
    session.select(folder).await.unwrap();
    session.uid_search("UNSEEN").await.unwrap().len()
}

/// A customer's email with two files: a PDF and a text in Croatian.
fn mail_with_files(to: &str, message_id: &str, subject: &str, text: &str) -> Vec<u8> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    format!(
        "From: Ana Horvat <ana@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n\
         Message-ID: <{message_id}>\r\nDate: Thu, 03 Dec 2026 09:00:00 +0100\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
         {text}\r\n\
         --b1\r\nContent-Type: application/pdf; name=\"racun.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"racun.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8; name=\"=?UTF-8?Q?bilje=C5=A1ka.txt?=\"\r\n\
         Content-Disposition: attachment; filename*=UTF-8''bilje%C5%A1ka.txt\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b1--\r\n",
        b64(PDF),
        b64("Račun br. 12/2026 je plaćen.".as_bytes()),
    )
    .into_bytes()
}

const PDF: &[u8] = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n\x00\x01\x02\xff%%EOF\n";

async fn mailbox_channel(
    app: &TestApp,
    t: &TestTenant,
    smtp_port: u16,
    imap_port: u16,
    extra: Value,
) -> common::Resp {
    let mut settings = json!({"host": "127.0.0.1", "port": smtp_port, "security": "none",
        "from": "podrska@acme.example", "from_name": "Acme",
        "reply_address": "podrska@acme.example",
        "imap_host": "127.0.0.1", "imap_port": imap_port, "imap_security": "none",
        "imap_user": "podrska"});
    for (k, v) in extra.as_object().unwrap() {
        settings[k] = v.clone();
    }
    app.put(
        "/v1/channels/email",
        &t.key,
        json!({"provider": "smtp", "settings": settings,
               "secrets": {"imap_password": "tajna", "inbound_secret": "s3cret"}}),
    )
    .await
}

fn header<'a>(mail: &'a str, name: &str) -> Option<&'a str> {
    mail.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

fn tenant_id(t: &TestTenant) -> TenantId {
    TenantId(t.id.parse().unwrap())
}

#[tokio::test]
async fn a_mailbox_is_read_once_and_a_reply_finds_its_ticket_by_the_signed_address() {
    let Some(imap) = Dovecot::start(&[("podrska", "tajna")]) else {
        return;
    };
    let app = TestApp::new().await;
    let t = app.tenant("acme").await;
    let (smtp_port, mails) = crate::providers::smtp_sink(false).await;

    // What the settings must be: a host we may reach, a user, a password.
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "log", "settings": {"imap_host": "10.0.0.7", "imap_security": "plain",
                   "reply_address": "not an address"}}),
        )
        .await;
    r.assert_problem(422);
    for field in [
        "settings.imap_host",
        "settings.imap_security",
        "settings.imap_user",
        "settings.reply_address",
    ] {
        assert!(
            r.error_fields().contains(&field.to_owned()),
            "{field}: {}",
            r.text
        );
    }
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "log", "settings": {"imap_host": "127.0.0.1", "imap_user": "podrska"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["secrets.imap_password"]);
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "log", "settings": {"imap_host": "imap.example.com",
                   "imap_security": "none", "imap_user": "podrska"},
                   "secrets": {"imap_password": "tajna"}}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(
        r.error_fields(),
        ["settings.imap_security"],
        "no password in the clear over the internet"
    );

    let r = mailbox_channel(&app, &t, smtp_port, imap.port, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["secrets"],
        json!(["imap_password", "inbound_secret"])
    );
    assert!(!r.text.contains("tajna"), "secrets never come back");

    let ticket = crate::conversations::ana_email_ticket(&app, &t, "Kartica mi ne radi.").await;
    app.drain().await;
    // The acknowledgement answers to the ticket's own, signed address.
    let ack = mails.lock().unwrap()[0].clone();
    let reply_to = header(&ack, "Reply-To").expect("Reply-To").to_owned();
    assert!(
        reply_to.starts_with("podrska+t1.") && reply_to.ends_with("@acme.example"),
        "{reply_to}"
    );
    app.patch(
        &format!("/v1/tickets/{ticket}"),
        &t.key,
        json!({"status": "solved"}),
    )
    .await;

    // Ana answers from a client that keeps no thread headers and changes the subject; a
    // stranger writes to the plain address. Both land in the mailbox.
    let mut client = imap.login("podrska", "tajna").await;
    append(
        &mut client,
        "INBOX",
        &mail_with_files(
            &reply_to,
            "ana-1@example.com",
            "Evo računa",
            "Šaljem račun i bilješku.",
        ),
    )
    .await;
    append(
        &mut client,
        "INBOX",
        b"From: Ivo <ivo@example.net>\r\nTo: podrska@acme.example\r\nSubject: Pitanje\r\n\
          Message-ID: <ivo-1@example.net>\r\n\r\nKoliko traje odobrenje kredita?\r\n",
    )
    .await;
    // A message that is not an email Rapport can file (no From): left unread, and skipped.
    append(
        &mut client,
        "INBOX",
        b"Subject: no sender\r\nMessage-ID: <x@y>\r\n\r\nhello\r\n",
    )
    .await;
    assert_eq!(unseen(&mut client, "INBOX").await, 3);

    let round = rapport::inbound::imap::poll_once(&app.app.state, tenant_id(&t))
        .await
        .expect("a round")
        .expect("the mailbox is free");
    assert_eq!((round.fetched, round.skipped), (2, 1), "{round:?}");
    assert_eq!(
        unseen(&mut client, "INBOX").await,
        1,
        "filed mail is \\Seen; the unreadable one is left for a person"
    );

    let detail = app.get(&format!("/v1/tickets/{ticket}"), &t.key).await;
    assert_eq!(detail.body["status"], "open", "the reply reopens it");
    let messages = detail.body["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["body"], "Šaljem račun i bilješku.");
    let files = messages[1]["attachments"].as_array().unwrap().clone();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0]["filename"], "racun.pdf");
    assert_eq!(files[0]["content_type"], "application/pdf");
    assert_eq!(files[0]["size"], PDF.len());
    assert_eq!(files[1]["filename"], "bilješka.txt");
    let pdf = app
        .get(
            &format!("/v1/attachments/{}", files[0]["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    assert_eq!(pdf.status, StatusCode::OK);
    assert_eq!(pdf.bytes, PDF, "the file, byte for byte");
    assert_eq!(pdf.content_type(), "application/pdf");
    assert!(
        pdf.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"racun.pdf\""),
        "always a download"
    );
    assert_eq!(pdf.headers["x-content-type-options"], "nosniff");
    let note = app
        .get(
            &format!("/v1/attachments/{}", files[1]["id"].as_str().unwrap()),
            &t.key,
        )
        .await;
    assert_eq!(note.text, "Račun br. 12/2026 je plaćen.");
    let other = app.tenant("other").await;
    app.get(
        &format!("/v1/attachments/{}", files[0]["id"].as_str().unwrap()),
        &other.key,
    )
    .await
    .assert_problem(404);

    // The stranger has a contact and a ticket of his own, acknowledged.
    let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
    let ivo = tickets
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["subject"] == "Pitanje")
        .expect("a ticket for the stranger")
        .clone();
    assert_eq!(ivo["channel"], "email");

    // Nothing is read twice: not on the next round, not when a person marks the mail unread
    // again (the mark is the UID), not when a second reader tries meanwhile.
    let again = rapport::inbound::imap::poll_once(&app.app.state, tenant_id(&t))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.fetched, again.skipped), (0, 0));
    client.select("INBOX").await.unwrap();
    client
        .uid_store("1:*", "-FLAGS.SILENT (\\Seen)")
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let again = rapport::inbound::imap::poll_once(&app.app.state, tenant_id(&t))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.fetched, 0);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM inbound_messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);

    let channel = app.get("/v1/channels/email", &t.key).await;
    let mailbox = &channel.body["mailbox"];
    assert_eq!(mailbox["fetched"], 2, "{mailbox}");
    assert_eq!(mailbox["skipped"], 1, "{mailbox}");
    assert!(mailbox["last_polled_at"].is_string(), "{mailbox}");

    // A wrong password is the tenant's to see, on the channel.
    let r = app
        .put(
            "/v1/channels/email",
            &t.key,
            json!({"provider": "smtp", "settings": r.body["settings"].clone(),
                   "secrets": {"imap_password": "kriva"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let failed = rapport::inbound::imap::poll_once(&app.app.state, tenant_id(&t)).await;
    let e = failed.expect_err("refused").to_string();
    assert!(
        e.contains("refused the user name or password of podrska"),
        "{e}"
    );
    let channel = app.get("/v1/channels/email", &t.key).await;
    assert_eq!(channel.body["mailbox"]["last_error"], e.as_str());
    client.logout().await.unwrap();
}

#[tokio::test]
async fn two_workers_watch_a_mailbox_with_idle_and_file_each_mail_once() {
    let Some(imap) = Dovecot::start(&[("podrska", "tajna")]) else {
        return;
    };
    // Polling is slow here: only IDLE can bring mail in within the test's patience.
    let app = TestApp::with_config(|c| c.imap_poll_secs = 60).await;
    let t = app.tenant("acme").await;
    let (smtp_port, _mails) = crate::providers::smtp_sink(false).await;
    let mut client = imap.login("podrska", "tajna").await;
    client.create("Rapport").await.unwrap();
    let r = mailbox_channel(
        &app,
        &t,
        smtp_port,
        imap.port,
        json!({"imap_processed_folder": "Rapport"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let stop = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(rapport::inbound::imap::run(
                app.app.state.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Watched: one worker holds the mailbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let channel = app.get("/v1/channels/email", &t.key).await;
        if channel.body["mailbox"]["watched"] == true
            && channel.body["mailbox"]["last_polled_at"].is_string()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", channel.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..5 {
        append(
            &mut client,
            "INBOX",
            format!(
                "From: kupac{n}@example.com\r\nTo: podrska@acme.example\r\nSubject: Upit {n}\r\n\
                 Message-ID: <upit-{n}@example.com>\r\n\r\nPoruka broj {n}.\r\n"
            )
            .as_bytes(),
        )
        .await;
    }
    // IDLE brings the five in.
    common::count_reaches(
        &app.pool,
        "SELECT count(*) FROM inbound_messages",
        5,
        std::time::Instant::now(),
        Duration::from_secs(20),
    )
    .await;
    // Moved out of the inbox once filed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let inbox = client.select("INBOX").await.unwrap().exists;
        let done = client.select("Rapport").await.unwrap().exists;
        if (inbox, done) == (0, 5) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "inbox {inbox}, Rapport {done}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for w in workers {
        tokio::time::timeout(Duration::from_secs(70), w)
            .await
            .expect("the workers stop")
            .unwrap();
    }
    let tickets: i64 = sqlx::query_scalar("SELECT count(*) FROM tickets")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(tickets, 5, "one ticket per mail, whichever worker read it");
    let held: Option<uuid::Uuid> = sqlx::query_scalar("SELECT holder FROM inbound_mailboxes")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(held, None, "a stopping worker gives the mailbox up");
    client.logout().await.unwrap();
}

mod files_and_followups {
    use super::*;

    fn post(t: &TestTenant, raw: Vec<u8>) -> axum::http::Request<axum::body::Body> {
        crate::conversations::email_in::post(t, raw, "s3cret", "message/rfc822")
    }

    #[tokio::test]
    async fn files_over_the_limit_are_listed_as_dropped_and_a_closed_ticket_is_followed() {
        // Room for the PDF, not for the note after it.
        let app = TestApp::with_config(|c| c.attachment_max_bytes = PDF.len() + 5).await;
        let t = app.tenant("acme").await;
        let r = app
            .put(
                "/v1/channels/email",
                &t.key,
                json!({"provider": "log", "secrets": {"inbound_secret": "s3cret"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let r = app
            .send(post(
                &t,
                mail_with_files("podrska@acme.example", "a1@example.com", "Računi", "Evo."),
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
        let first = tickets[0]["id"].as_str().unwrap().to_owned();
        let detail = app.get(&format!("/v1/tickets/{first}"), &t.key).await;
        let files = detail.body["messages"][0]["attachments"].clone();
        assert_eq!(files[0]["dropped"], Value::Null, "{files}");
        assert!(
            files[1]["dropped"]
                .as_str()
                .is_some_and(|d| d.contains("over the limit")),
            "{files}"
        );
        assert_eq!(files[1]["size"], "Račun br. 12/2026 je plaćen.".len());
        let r = app
            .get(
                &format!("/v1/attachments/{}", files[1]["id"].as_str().unwrap()),
                &t.key,
            )
            .await;
        r.assert_problem(404);
        assert!(r.text.contains("was not kept"), "{}", r.text);
        let inbound = detail.body["messages"][0]["inbound_id"].as_str().unwrap();
        let original = app
            .get(&format!("/v1/inbound-messages/{inbound}"), &t.key)
            .await;
        assert_eq!(
            original.body["attachments"], files,
            "listed on the record too"
        );

        // Closed: the next mail on the thread opens a new ticket that names it.
        for status in ["solved", "closed"] {
            let r = app
                .patch(
                    &format!("/v1/tickets/{first}"),
                    &t.key,
                    json!({"status": status}),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        let r = app
            .send(post(
                &t,
                b"From: Ana Horvat <ana@example.com>\r\nTo: podrska@acme.example\r\n\
                  Subject: Re: Racuni\r\nMessage-ID: <a2@example.com>\r\n\
                  In-Reply-To: <a1@example.com>\r\n\r\nJos jedno pitanje.\r\n"
                    .to_vec(),
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let tickets = app.get("/v1/tickets", &t.key).await.body["data"].clone();
        assert_eq!(tickets.as_array().unwrap().len(), 2, "{tickets}");
        let newer = &tickets[0];
        assert_ne!(newer["id"], first.as_str());
        assert_eq!(newer["follows_ticket_id"], first.as_str(), "{newer}");
        let old = app.get(&format!("/v1/tickets/{first}"), &t.key).await;
        assert_eq!(old.body["status"], "closed");

        // Erasure takes the files too.
        let contact = newer["contact_id"].as_str().unwrap();
        let r = app.delete(&format!("/v1/contacts/{contact}"), &t.key).await;
        assert!(r.status.is_success(), "{}", r.text);
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbound_attachments")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }
}
