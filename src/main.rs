//! The `rapport` binary: the service (`serve`, `api`, `worker`) and operators' commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rapport::domain::TenantId;
use rapport::error::ApiError;
use rapport::tenants::{model::NewTenant, store as tenants};
use rapport::{App, Config, telemetry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The server's allocator (Cargo.toml says why); the benchmark client keeps the system's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Memory the server frees goes back to the system once the load that needed it has passed.
///
/// mimalloc keeps a thread's emptied pages for that thread and gives free arena memory back
/// lazily, from later allocations, so a server that fell quiet after a burst kept memory it
/// no longer used: 54-66 MB idle after the benchmark's runs, 50 MB with this module
/// (BENCHMARKS.md, twenty-first round). Every [`EVERY`] a task
/// moves [`EPOCH`] on and collects its own thread's heap and every arena's free memory
/// (forced); each runtime thread collects its own heap the next time it parks, once an epoch,
/// so the cost under load is an atomic load each time a thread parks.
mod reclaim {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    pub const EVERY: Duration = Duration::from_secs(5);
    /// mimalloc's `mi_option_purge_delay` (15 in its v2 and v3 alike; the Rust binding names
    /// no constant for it; `tests::purge_delay_is_the_option_set` checks the number).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    static EPOCH: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SEEN: Cell<u64> = const { Cell::new(0) };
    }

    /// Freed memory goes back to the system at once, not a second later (mimalloc's default):
    /// a purge then waits for that thread's next allocation, so a burst's memory stayed
    /// resident once the server fell quiet. Peaks of 74-82 MB against 106-121 MB over the
    /// benchmark's rows 1 and 3 and the 1,000,000-row import, with no cost the benchmark could
    /// tell from its noise (BENCHMARKS.md, twenty-first round).
    /// `MIMALLOC_PURGE_DELAY` in the environment still decides, when set.
    pub fn configure() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none()
            && std::env::var_os("MIMALLOC_RESET_DELAY").is_none()
        {
            // SAFETY: sets an option mimalloc reads on each purge; any value is valid.
            unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
        }
    }

    /// The runtime's `on_thread_park` hook.
    pub fn on_park() {
        let epoch = EPOCH.load(Ordering::Relaxed);
        if SEEN.get() != epoch {
            SEEN.set(epoch);
            // SAFETY: mimalloc is the global allocator; collecting the calling thread's heap
            // only frees pages that hold no live block.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    }

    /// Moves the epoch on every [`EVERY`], for the life of the process.
    pub async fn run() {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            EPOCH.fetch_add(1, Ordering::Relaxed);
            // SAFETY: as above; `force` also purges free memory of every arena, whoever freed it.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    }

    #[cfg(test)]
    mod tests {
        use std::ffi::{CStr, c_char, c_void};

        unsafe extern "C" {
            fn mi_options_print_out(
                out: unsafe extern "C" fn(*const c_char, *mut c_void),
                arg: *mut c_void,
            );
        }

        unsafe extern "C" fn collect(message: *const c_char, into: *mut c_void) {
            // SAFETY: `into` is the `String` passed below; mimalloc passes C strings.
            let (into, message) = unsafe { (&mut *into.cast::<String>(), CStr::from_ptr(message)) };
            into.push_str(&message.to_string_lossy());
        }

        /// mimalloc's own listing of its options, by name.
        fn options() -> String {
            let mut printed = String::new();
            // SAFETY: `collect` appends to `printed`, which outlives the call.
            unsafe { mi_options_print_out(collect, (&raw mut printed).cast()) };
            printed
        }

        #[test]
        fn purge_delay_is_the_option_set() {
            // SAFETY: as in `configure`.
            unsafe { libmimalloc_sys::mi_option_set(super::PURGE_DELAY, 4321) };
            let printed = options();
            let line = printed
                .lines()
                .find(|l| l.contains("4321"))
                .unwrap_or_default();
            assert!(line.contains("purge_delay"), "{printed}");
            unsafe { libmimalloc_sys::mi_option_set(super::PURGE_DELAY, 0) };
        }
    }
}

#[derive(Parser)]
#[command(
    name = "rapport",
    version,
    about = "Self-hostable, multi-tenant customer-engagement backend"
)]
struct Cli {
    /// Configuration file; RAPPORT_* environment variables override it.
    #[arg(
        long,
        env = "RAPPORT_CONFIG",
        default_value = "config/default.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the background worker in one process (the default).
    Serve,
    /// Run the HTTP API only.
    Api,
    /// Run the background worker only.
    Worker,
    /// Create the database if missing and apply pending migrations, then exit.
    Migrate,
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage tenants' API keys.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Load a tenant's data in bulk.
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Provider secrets and keys.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Render tenants' templates for a parent process (one JSON line a request); the service
    /// starts these itself.
    #[command(name = "render-sandbox", hide = true)]
    RenderSandbox {
        /// Address space this process may use.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Import contacts from a CSV or NDJSON file as `POST /v1/contacts/imports` does, then
    /// write them here with a progress bar (or leave them to the workers with --detach), and
    /// print the import's summary as JSON. Interrupted, the import resumes in any worker.
    Contacts {
        /// The file; `.ndjson` or `.jsonl` is read as NDJSON, anything else as CSV.
        file: PathBuf,
        /// Tenant id or slug.
        #[arg(long)]
        tenant: String,
        /// csv or ndjson (instead of the file's extension).
        #[arg(long)]
        format: Option<String>,
        /// upsert, create_only or update_only.
        #[arg(long, default_value = "upsert")]
        mode: String,
        /// Validate and count; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// COLUMN=FIELD, as often as needed (`Tel=phone`, `Limit=attributes.credit_limit`);
        /// `COLUMN=` leaves the column out.
        #[arg(long = "map", value_name = "COLUMN=FIELD")]
        map: Vec<String>,
        /// CSV separator: , ; tab or | (guessed from the header when absent).
        #[arg(long)]
        delimiter: Option<String>,
        /// The file's character set: utf-8 (default), windows-1250, iso-8859-2...
        #[arg(long)]
        charset: Option<String>,
        /// Store the file and return; the workers write it.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Re-seal every stored secret (channels, integrations, the link-signing key) with
    /// RAPPORT_SECRET_KEY, opening them with it or with RAPPORT_SECRET_KEY_OLD. Run it after
    /// replacing the key; then the old key can be dropped.
    Rotate,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant and print it as JSON.
    Create {
        #[arg(long)]
        name: String,
        /// Derived from the name when absent.
        #[arg(long)]
        slug: Option<String>,
        /// ISO 3166-1 alpha-2 (HR, SI, GB...).
        #[arg(long)]
        default_country: String,
        #[arg(long, default_value = "en")]
        default_locale: String,
        #[arg(long, default_value = "UTC")]
        timezone: String,
    },
    /// List tenants as JSON lines.
    List,
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key and print it (the only time the key is shown).
    Create {
        /// Tenant id or slug.
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
    },
    /// Revoke an API key at once.
    Revoke {
        /// Tenant id or slug.
        #[arg(long)]
        tenant: String,
        /// The key's id.
        key_id: uuid::Uuid,
    },
    /// List a tenant's API keys (without the secrets) as JSON lines.
    List {
        /// Tenant id or slug.
        #[arg(long)]
        tenant: String,
    },
}

fn main() -> ExitCode {
    reclaim::configure();
    let cli = Cli::parse();
    if let Some(Command::RenderSandbox { memory_mib }) = cli.command {
        return match rapport::templates::sandbox::run_child(memory_mib) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    if matches!(cli.command, Some(Command::Openapi)) {
        println!(
            "{}",
            rapport::api::openapi().to_pretty_json().unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(reclaim::on_park)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    let is_service = matches!(command, Command::Serve | Command::Api | Command::Worker);
    if is_service {
        telemetry::init_logging(&config);
    }
    let mut embedded = private_database(&mut config, is_service).await?;
    let outcome = run_with(command, config).await;
    if let Some(mut db) = embedded.take() {
        let _ = tokio::task::spawn_blocking(move || db.stop()).await;
        tracing::info!("private PostgreSQL stopped");
    }
    outcome
}

/// The private PostgreSQL of `embedded_postgres` (see `rapport::embedded_pg`), pointed to by
/// `config.database_url` when one is used: one already running in `var/pgdata` (another
/// command's), or one started now.
async fn private_database(
    config: &mut Config,
    logging: bool,
) -> anyhow::Result<Option<rapport::embedded_pg::Embedded>> {
    use rapport::embedded_pg::{self, Mode};
    let url_given = std::env::var_os("DATABASE_URL").is_some()
        || std::env::var_os("RAPPORT_DATABASE_URL").is_some()
        || config.database_url != Config::default().database_url;
    let wanted = match config.embedded_postgres {
        Mode::Never => false,
        Mode::Always => true,
        Mode::Auto => {
            let url = config.database_url.clone();
            !url_given && !tokio::task::spawn_blocking(move || embedded_pg::answers(&url)).await?
        }
    };
    if !wanted {
        return Ok(None);
    }
    let data_dir = std::path::PathBuf::from("var/pgdata");
    if let Some(url) = embedded_pg::running(&data_dir) {
        config.database_url = url.into();
        tracing::info!(data = %data_dir.display(), "using the private PostgreSQL already running");
        return Ok(None);
    }
    let bin = embedded_pg::find_binaries().ok_or(embedded_pg::EmbeddedError::NoBinaries)?;
    let started =
        tokio::task::spawn_blocking(move || embedded_pg::start(&bin, &data_dir)).await??;
    if logging {
        tracing::warn!(
            bin = %started.bin_dir.display(),
            data = %started.data_dir.display(),
            "no DATABASE_URL and nothing answers on the default address: started a private \
             PostgreSQL for trying Rapport (not for production: set DATABASE_URL to a real \
             server); it stops with this process"
        );
    } else {
        eprintln!(
            "rapport: started a private PostgreSQL from {} with its data in {} (for trying \
             Rapport; set DATABASE_URL for production)",
            started.bin_dir.display(),
            started.data_dir.display()
        );
    }
    config.database_url = started.url.clone().into();
    Ok(Some(started))
}

async fn run_with(command: Command, config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    match command {
        Command::Serve => serve(app, true, true).await,
        Command::Api => serve(app, true, false).await,
        Command::Worker => serve(app, false, true).await,
        Command::Migrate => {
            println!("migrations applied");
            Ok(())
        }
        Command::Tenant { command } => tenant_command(&app, command).await,
        Command::ApiKey { command } => api_key_command(&app, command).await,
        Command::Import { command } => import_command(&app, command).await,
        Command::Secrets {
            command: SecretsCommand::Rotate,
        } => rotate_secrets(&app).await,
        Command::Openapi | Command::RenderSandbox { .. } => Ok(()),
    }
}

async fn serve(app: App, api: bool, worker: bool) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    tokio::spawn(reclaim::run());
    let mut tasks = tokio::task::JoinSet::new();
    if api {
        let listen = app.state.config.listen.clone();
        let listener = TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        tracing::info!(address = %listener.local_addr()?, "listening");
        let (app, token) = (app.clone(), shutdown.clone());
        tasks.spawn(async move {
            app.run_api(listener, token)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    if api && !worker {
        // No engine here to ring: the workers hear of this process's events by NOTIFY.
        tokio::spawn(rapport::events::inbox::forward(
            app.state.pool.clone(),
            shutdown.clone(),
        ));
    }
    if worker {
        let (app, token) = (app.clone(), shutdown.clone());
        tasks.spawn(async move {
            app.run_worker(token).await;
            Ok(())
        });
    }
    let mut outcome = Ok(());
    while let Some(result) = tasks.join_next().await {
        // One half failing stops the other.
        shutdown.cancel();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => outcome = Err(e),
            Err(e) => outcome = Err(e.into()),
        }
    }
    app.state.pool.close().await;
    app.state.listen_pool.close().await;
    tracing::info!("stopped");
    outcome
}

async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested; finishing in-flight work");
    token.cancel();
}

/// A store or validation error as one line for the terminal.
fn cli_error(e: impl Into<ApiError>) -> anyhow::Error {
    match e.into() {
        ApiError::Validation { errors, .. } => anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(|f| format!("--{}: {}", f.field.replace('_', "-"), f.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        other => anyhow::anyhow!("{}", other.to_problem().detail),
    }
}

async fn rotate_secrets(app: &App) -> anyhow::Result<()> {
    let secrets = &app.state.secrets;
    if !secrets.can_seal() {
        anyhow::bail!(
            "set RAPPORT_SECRET_KEY to the new key (and RAPPORT_SECRET_KEY_OLD to the old ones)"
        );
    }
    // One transaction: every secret moves to the new key, or none does.
    let mut tx = rapport::db::begin(&app.state.pool).await?;
    let channels = rapport::channels::settings::reseal_all(&mut tx, secrets).await?;
    let integrations = rapport::telephony::integrations::reseal_all(&mut tx, secrets).await?;
    tx.commit().await?;
    let link_key = rapport::signing::Signer::reseal(&app.state.pool, secrets).await?;
    println!(
        "re-sealed with the current key: {channels} channel configurations, {integrations} integrations{}",
        if link_key {
            ", the link-signing key"
        } else {
            ""
        }
    );
    println!("RAPPORT_SECRET_KEY_OLD can now be removed");
    Ok(())
}

async fn tenant_command(app: &App, command: TenantCommand) -> anyhow::Result<()> {
    let mut conn = app.state.pool.acquire().await?;
    match command {
        TenantCommand::Create {
            name,
            slug,
            default_country,
            default_locale,
            timezone,
        } => {
            let new = NewTenant {
                name,
                slug,
                default_country,
                default_locale,
                timezone,
            };
            let valid = new.validate().map_err(cli_error)?;
            let tenant = tenants::create(&mut conn, &valid)
                .await
                .map_err(cli_error)?;
            println!("{}", serde_json::to_string_pretty(&tenant)?);
        }
        TenantCommand::List => {
            let mut before = None;
            loop {
                let page = tenants::list(&mut conn, before, 500)
                    .await
                    .map_err(cli_error)?;
                for t in page.iter().take(500) {
                    println!("{}", serde_json::to_string(t)?);
                }
                if page.len() <= 500 {
                    break;
                }
                before = page.get(499).map(|t| t.id);
            }
        }
    }
    Ok(())
}

async fn import_command(app: &App, command: ImportCommand) -> anyhow::Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};
    use rapport::contacts::import::{self, receive::ReceiveError, routes::ImportParams};
    let ImportCommand::Contacts {
        file,
        tenant,
        format,
        mode,
        dry_run,
        map,
        delimiter,
        charset,
        detach,
    } = command;
    let pool = &app.state.pool;
    let mut conn = pool.acquire().await?;
    let found = tenants::find(&mut conn, &tenant)
        .await
        .map_err(cli_error)?
        .ok_or_else(|| anyhow::anyhow!("no tenant with id or slug `{tenant}`"))?;
    let tenant_id = TenantId(found.id);
    let context = tenants::context(&mut conn, tenant_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no tenant with id or slug `{tenant}`"))?;
    drop(conn);
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = format.unwrap_or_else(|| match extension.as_str() {
        "ndjson" | "jsonl" => "ndjson".to_owned(),
        _ => "csv".to_owned(),
    });
    let mut mapping = serde_json::Map::new();
    for pair in &map {
        let (column, field) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--map {pair}: expected COLUMN=FIELD"))?;
        let target = if field.is_empty() {
            serde_json::Value::Null
        } else {
            field.into()
        };
        mapping.insert(column.to_owned(), target);
    }
    let params: ImportParams = serde_json::from_value(serde_json::json!({
        "format": format,
        "mode": mode,
        "dry_run": dry_run,
        "filename": file.file_name().map(|n| n.to_string_lossy().into_owned()),
        "mapping": (!mapping.is_empty()).then(|| serde_json::Value::Object(mapping).to_string()),
        "delimiter": delimiter,
        "charset": charset,
    }))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let opts = import::routes::options(params, &axum::http::HeaderMap::new()).map_err(cli_error)?;
    let handle = std::fs::File::open(&file)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
    let size = handle.metadata().map(|m| m.len()).unwrap_or(0);
    let reading = ProgressBar::new(size).with_style(ProgressStyle::with_template(
        "reading  {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )?);
    let reader = reading.wrap_read(handle);
    let config = &app.state.config;
    let (max, deadline) = (config.import_max_bytes, config.import_timeout_secs + 60);
    let id = match import::receive::receive(pool, &context, opts, reader, max, deadline).await {
        Ok(Ok(id) | Err(id)) => id,
        Err(ReceiveError::Invalid(errors)) => anyhow::bail!(
            "{}",
            errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Err(e) => return Err(e.into()),
    };
    reading.finish_and_clear();
    let view = async || {
        import::store::fetch(pool, tenant_id, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("import {id} vanished"))
    };
    if !detach {
        let total = view().await?.rows;
        let writing = ProgressBar::new(u64::try_from(total).unwrap_or(0)).with_style(
            ProgressStyle::with_template("writing  {bar:40} {pos}/{len} rows {per_sec} {eta}")?,
        );
        let holder = uuid::Uuid::now_v7();
        let bar = writing.clone();
        let here = import::apply::run_import(pool, tenant_id, id, holder, move |n| bar.inc(n))
            .await
            .map_err(cli_error)?;
        if !here {
            // A worker holds it: follow its progress.
            loop {
                let now = view().await?;
                writing.set_position(u64::try_from(now.processed).unwrap_or(0));
                if !now.status.is_pending() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        writing.finish_and_clear();
    }
    let summary = view().await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if summary.status == import::ImportStatus::Failed {
        anyhow::bail!("the import failed: {}", summary.error.unwrap_or_default());
    }
    Ok(())
}

async fn api_key_command(app: &App, command: ApiKeyCommand) -> anyhow::Result<()> {
    let mut conn = app.state.pool.acquire().await?;
    let find = async |conn: &mut sqlx::PgConnection, tenant: &str| {
        tenants::find(conn, tenant)
            .await
            .map_err(cli_error)?
            .ok_or_else(|| anyhow::anyhow!("no tenant with id or slug `{tenant}`"))
    };
    match command {
        ApiKeyCommand::Create { tenant, name } => {
            let tenant = find(&mut conn, &tenant).await?;
            let name =
                rapport::validate::text(&name, 200).map_err(|m| anyhow::anyhow!("--name: {m}"))?;
            let key = tenants::create_key(&mut conn, TenantId(tenant.id), &name)
                .await
                .map_err(cli_error)?;
            println!("{}", serde_json::to_string_pretty(&key)?);
        }
        ApiKeyCommand::Revoke { tenant, key_id } => {
            let tenant = find(&mut conn, &tenant).await?;
            if !tenants::revoke_key(&mut conn, TenantId(tenant.id), key_id)
                .await
                .map_err(cli_error)?
            {
                anyhow::bail!("tenant {} has no API key with id {key_id}", tenant.slug);
            }
            println!("revoked {key_id}");
        }
        ApiKeyCommand::List { tenant } => {
            let tenant = find(&mut conn, &tenant).await?;
            for key in tenants::list_keys(&mut conn, TenantId(tenant.id))
                .await
                .map_err(cli_error)?
            {
                println!("{}", serde_json::to_string(&key)?);
            }
        }
    }
    Ok(())
}
