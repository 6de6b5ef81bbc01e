//! Tenant templates are programs, so they run where they cannot hurt the service: in child
//! processes of the same binary (`rapport render-sandbox`), each with a cap on its address
//! space and a wall-clock deadline.
//!
//! Why processes and not threads: minijinja's fuel counts instructions, not bytes, and one
//! instruction can allocate without bound (`a ~ a` doubles a string, `indent(10**11)` asks for
//! 100 GB at once). A failed allocation aborts a Rust process, and no stable API lets a thread
//! survive it, so the only place a template may run out of memory is a process of its own. A
//! child that dies or misses its deadline is killed and replaced; the request that ran it gets
//! a clear error and nobody else notices.
//!
//! The parent speaks one JSON line per request and per answer over the child's stdin and
//! stdout; a render costs a round trip of some tens of microseconds on top of the render.

use std::borrow::Cow;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;

use super::model::{Rendered, Variants};
use super::render::{self, RenderError};
use crate::domain::Channel;

/// The subcommand that runs a child (hidden from `--help`).
pub const SUBCOMMAND: &str = "render-sandbox";

/// Bounds of one render.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time a render may take, waiting for a free child included.
    pub timeout: Duration,
    /// Address space of a child, in MiB.
    pub memory_mib: u64,
    /// Children at once: renders beyond that wait for one to be free.
    pub workers: usize,
}

/// Why a render did not produce text.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The template's fault: a syntax or variable error, or a limit it exceeded.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// Ours: the child could not be started or spoke nonsense.
    #[error("the template renderer is unavailable: {0}")]
    Unavailable(String),
}

/// The pool of render children; cheap to clone.
#[derive(Clone)]
pub struct Sandbox(Arc<Inner>);

struct Inner {
    program: PathBuf,
    limits: Limits,
    permits: Semaphore,
    idle: Mutex<Vec<Worker>>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

#[derive(Serialize, Deserialize)]
enum Request<'a> {
    Variant {
        variants: Cow<'a, Variants>,
        channel: Channel,
        locale: Cow<'a, str>,
        ctx: Cow<'a, Value>,
    },
    Text {
        name: Cow<'a, str>,
        source: Cow<'a, str>,
        field: Cow<'a, str>,
        ctx: Cow<'a, Value>,
    },
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Rendered(Rendered),
    Text(String),
    Failed(RenderError),
}

impl Sandbox {
    /// A pool running `program` (the `rapport` binary) as its children; none start until the
    /// first render.
    pub fn new(program: PathBuf, limits: Limits) -> Sandbox {
        let workers = limits.workers.max(1);
        Sandbox(Arc::new(Inner {
            program,
            limits,
            permits: Semaphore::new(workers),
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Renders `channel`'s variant in `locale` (see [`render::render`]).
    pub async fn render(
        &self,
        variants: &Variants,
        channel: Channel,
        locale: &str,
        ctx: &Value,
    ) -> Result<Rendered, SandboxError> {
        let request = Request::Variant {
            variants: Cow::Owned(variants.only(channel, locale)),
            channel,
            locale: Cow::Borrowed(locale),
            ctx: Cow::Borrowed(ctx),
        };
        let field = format!("{}.{locale}", channel.as_str());
        match self.call(&request, &field).await? {
            Reply::Rendered(r) => Ok(r),
            Reply::Failed(e) => Err(e.into()),
            Reply::Text(_) => Err(SandboxError::Unavailable("unexpected answer".into())),
        }
    }

    /// Renders one text (see [`render::render_text`]).
    pub async fn render_text(
        &self,
        name: &str,
        source: &str,
        ctx: &Value,
        field: &str,
    ) -> Result<String, SandboxError> {
        let request = Request::Text {
            name: Cow::Borrowed(name),
            source: Cow::Borrowed(source),
            field: Cow::Borrowed(field),
            ctx: Cow::Borrowed(ctx),
        };
        match self.call(&request, field).await? {
            Reply::Text(t) => Ok(t),
            Reply::Failed(e) => Err(e.into()),
            Reply::Rendered(_) => Err(SandboxError::Unavailable("unexpected answer".into())),
        }
    }

    async fn call(&self, request: &Request<'_>, field: &str) -> Result<Reply, SandboxError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| SandboxError::Unavailable(e.to_string()))?;
        line.push(b'\n');
        let limits = self.0.limits;
        let exceeded = |message: String| {
            SandboxError::Render(RenderError {
                field: field.to_owned(),
                message,
            })
        };
        let work = async {
            let _permit = self
                .0
                .permits
                .acquire()
                .await
                .map_err(|e| SandboxError::Unavailable(e.to_string()))?;
            let pooled = self.0.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut worker = match pooled {
                Some(w) => w,
                None => self.spawn()?,
            };
            match worker.exchange(&line).await {
                Ok(reply) => {
                    self.0
                        .idle
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(worker);
                    Ok(reply)
                }
                Err(e) => {
                    // The child died mid-render: the one way out of an allocation it could
                    // not make. Reap it and say which limit the template met.
                    let _ = worker.child.start_kill();
                    let status = worker.child.wait().await.ok();
                    tracing::info!(error = %e, ?status, "a template's render child stopped");
                    Err(exceeded(format!(
                        "the template needs more than {} MiB of memory",
                        limits.memory_mib
                    )))
                }
            }
        };
        // A child still running at the deadline is dropped with the future, which kills it.
        match tokio::time::timeout(limits.timeout, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(exceeded(format!(
                "the template did not finish rendering within {} ms",
                limits.timeout.as_millis()
            ))),
        }
    }

    fn spawn(&self) -> Result<Worker, SandboxError> {
        let mut child = child_command(&self.0.program, self.0.limits.memory_mib)
            .spawn()
            .map_err(|e| {
                SandboxError::Unavailable(format!("cannot start {}: {e}", self.0.program.display()))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(SandboxError::Unavailable("no pipes to the child".into()));
        };
        Ok(Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }
}

/// The command that starts a render child of `program` capped at `memory_mib` of address
/// space. The cap is set between fork and exec, so it holds from the child's first
/// instruction: the server's allocator (mimalloc) reserves a 1 GiB arena before `main`, and a
/// cap set later by the child itself would leave it that whole arena to fill (a template bomb
/// reached 540 MB resident under a 256 MiB cap).
pub fn child_command(program: &std::path::Path, memory_mib: u64) -> Command {
    let mut command = Command::new(program);
    command
        .arg(SUBCOMMAND)
        .arg("--memory-mib")
        .arg(memory_mib.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // A child that runs out of memory aborts; with backtraces on (an operator's
        // RUST_BACKTRACE=1), it would first spend seconds symbolising one nobody reads.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        // mimalloc reserves its arenas 1 GiB at a time; under the cap a child reserves small
        // ones as it needs them, so a small cap still leaves room to start.
        .env("MIMALLOC_ARENA_RESERVE", "4MiB")
        .kill_on_drop(true);
    #[cfg(unix)]
    {
        let limit = address_space(memory_mib);
        // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
        // the closure neither allocates nor takes a lock.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    command
}

#[cfg(unix)]
fn address_space(memory_mib: u64) -> libc::rlimit {
    let bytes = memory_mib.saturating_mul(1024 * 1024);
    libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    }
}

impl Worker {
    async fn exchange(&mut self, line: &[u8]) -> std::io::Result<Reply> {
        self.stdin.write_all(line).await?;
        self.stdin.flush().await?;
        let mut answer = String::new();
        if self.stdout.read_line(&mut answer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}

/// The child's side: caps its own address space, lowers its priority below the server's, then
/// answers one line per request until its stdin closes.
pub fn run_child(memory_mib: u64) -> std::io::Result<()> {
    limit_self(memory_mib);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Request<'_>>(&line) {
            Ok(Request::Variant {
                variants,
                channel,
                locale,
                ctx,
            }) => match render::render(&variants, channel, &locale, &ctx) {
                Ok(r) => Reply::Rendered(r),
                Err(e) => Reply::Failed(e),
            },
            Ok(Request::Text {
                name,
                source,
                field,
                ctx,
            }) => match render::render_text(&name, &source, &ctx, field.into_owned()) {
                Ok(t) => Reply::Text(t),
                Err(e) => Reply::Failed(e),
            },
            Err(e) => Reply::Failed(RenderError {
                field: String::new(),
                message: format!("bad request to the renderer: {e}"),
            }),
        };
        serde_json::to_writer(&mut stdout, &reply)?;
        stdout.write_all(b"\n")?;
        stdout.flush()?;
    }
    Ok(())
}

/// The child's own cap, for a child started some other way than [`child_command`] (which
/// sets it before the child runs at all), and its lower priority.
#[cfg(unix)]
fn limit_self(memory_mib: u64) {
    let limit = address_space(memory_mib);
    // SAFETY: plain system calls on this process, with a valid rlimit value.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &limit);
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(not(unix))]
fn limit_self(_memory_mib: u64) {}
