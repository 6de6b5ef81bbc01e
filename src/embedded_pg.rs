//! A private PostgreSQL for trying Rapport on a machine that has PostgreSQL's server binaries
//! installed but no database configured: `rapport serve` with no `DATABASE_URL` and nothing
//! answering on the default address starts one from those binaries, with its data under
//! `var/pgdata` and a Unix socket there (no TCP port), and stops it on shutdown.
//!
//! It is for a first look, not for production: one process owns it, nothing backs it up, and
//! it stops with the service. Production points `DATABASE_URL` at a real server.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// When to start a private PostgreSQL (`embedded_postgres`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// When no database URL was given and nothing answers on the default address.
    Auto,
    /// Always (the database URL is ignored).
    Always,
    /// Never.
    Never,
}

/// Why the private PostgreSQL could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked in RAPPORT_PG_BIN and \
         /usr/lib/postgresql/*/bin): install PostgreSQL's server package, or set DATABASE_URL"
    )]
    NoBinaries,
    #[error("{0}")]
    Failed(String),
}

/// A running private PostgreSQL; [`Embedded::stop`] shuts it down (so does dropping it).
pub struct Embedded {
    child: Option<Child>,
    /// `postgres://...` with the socket directory as `host`.
    pub url: String,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
}

/// The database URL of a private PostgreSQL whose socket is in `data_dir` (absolute).
pub fn socket_url(data_dir: &Path) -> String {
    let mut url = url::Url::parse("postgres://postgres@localhost/rapport")
        .unwrap_or_else(|_| unreachable!("a constant, valid URL"));
    url.query_pairs_mut()
        .append_pair("host", &data_dir.to_string_lossy())
        .append_pair("port", "5432");
    url.to_string()
}

/// The URL of the private PostgreSQL already running in `data_dir` (another `rapport`
/// command's), if one is.
pub fn running(data_dir: &Path) -> Option<String> {
    if !data_dir.join(".s.PGSQL.5432").exists() {
        return None;
    }
    data_dir.canonicalize().ok().map(|dir| socket_url(&dir))
}

/// Whether something accepts TCP connections at `url`'s host and port (default 5432).
pub fn answers(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed.port().unwrap_or(5432);
    let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)) else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a: SocketAddr| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

/// The directory holding `initdb` and `postgres`: `RAPPORT_PG_BIN`, else the newest of
/// Debian's `/usr/lib/postgresql/<version>/bin`.
pub fn find_binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("RAPPORT_PG_BIN").map(PathBuf::from) {
        return has_both(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The uid and gid of the `postgres` user, which the server runs as when we are root
/// (PostgreSQL refuses to run as root).
#[cfg(unix)]
fn postgres_user() -> Option<(u32, u32)> {
    let name = c"postgres";
    // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: non-null, points to a valid passwd record.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Some((uid, gid))
}

fn as_server_user(command: &mut Command, owner: Option<(u32, u32)>) {
    #[cfg(unix)]
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
}

/// Starts PostgreSQL from `bin_dir` with its data in `data_dir` (initialised on first use),
/// listening only on a Unix socket in that directory; waits until it accepts connections.
pub fn start(bin_dir: &Path, data_dir: &Path) -> Result<Embedded, EmbeddedError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        EmbeddedError::Failed(format!("private PostgreSQL: {what}: {e}"))
    };
    std::fs::create_dir_all(data_dir)
        .map_err(|e| failed("cannot create the data directory", &e))?;
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| failed("data directory", &e))?;
    #[cfg(unix)]
    let owner = {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let owner = postgres_user().ok_or_else(|| {
                EmbeddedError::Failed(
                    "private PostgreSQL: running as root, and there is no `postgres` user to run \
                     the server as"
                        .into(),
                )
            })?;
            chown_tree(&data_dir, owner)
                .map_err(|e| failed("cannot give the data directory to postgres", &e))?;
            // The server must reach its directory through every parent.
            let mut parent = data_dir.parent();
            while let Some(p) = parent {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(meta) = std::fs::metadata(p) {
                    let mode = meta.permissions().mode();
                    if mode & 0o001 == 0 {
                        let _ = std::fs::set_permissions(
                            p,
                            std::fs::Permissions::from_mode(mode | 0o001),
                        );
                    }
                }
                parent = p.parent();
            }
            Some(owner)
        } else {
            None
        }
    };
    #[cfg(not(unix))]
    let owner: Option<(u32, u32)> = None;
    if !data_dir.join("PG_VERSION").is_file() {
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_server_user(&mut initdb, owner);
        let out = initdb
            .output()
            .map_err(|e| failed("cannot run initdb", &e))?;
        if !out.status.success() {
            return Err(failed(
                "initdb failed",
                &String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("server.log"))
        .map_err(|e| failed("cannot open its log", &e))?;
    #[cfg(unix)]
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(data_dir.join("server.log"), Some(uid), Some(gid));
    }
    let mut postgres = Command::new(bin_dir.join("postgres"));
    postgres
        .arg("-D")
        .arg(&data_dir)
        .arg("-k")
        .arg(&data_dir)
        .args(["-c", "listen_addresses=", "-p", "5432"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    as_server_user(&mut postgres, owner);
    let child = postgres
        .spawn()
        .map_err(|e| failed("cannot start postgres", &e))?;
    let socket_dir = data_dir.to_string_lossy().into_owned();
    let mut embedded = Embedded {
        child: Some(child),
        url: socket_url(&data_dir),
        data_dir: data_dir.clone(),
        bin_dir: bin_dir.to_owned(),
    };
    let socket = data_dir.join(".s.PGSQL.5432");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(child) = embedded.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            embedded.child = None;
            return Err(EmbeddedError::Failed(format!(
                "private PostgreSQL stopped at start ({status}); see {}",
                data_dir.join("server.log").display()
            )));
        }
        let ready = Command::new(bin_dir.join("pg_isready"))
            .args(["-q", "-h", &socket_dir, "-p", "5432"])
            .status()
            .map(|s| s.success())
            .unwrap_or_else(|_| socket.exists());
        if ready {
            return Ok(embedded);
        }
        if Instant::now() > deadline {
            return Err(EmbeddedError::Failed(
                "private PostgreSQL did not accept connections within 30 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(unix)]
fn chown_tree(dir: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            chown_tree(&path, (uid, gid))?;
        } else {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

impl Embedded {
    /// Fast shutdown (open sessions are ended, nothing is lost), waiting for the server.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        #[cfg(unix)]
        {
            let pid = child.id() as libc::pid_t;
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}
