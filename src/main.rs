//! The `fulcrum` command: parses the command line, sets up logging, calls the library and maps
//! errors to exit codes (0 ok, 1 failure, 2 usage). Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fulcrum::config::LogFormat;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fulcrum",
    version,
    about = "A layer-4 (TCP) load balancer: least connections, mTLS, per-client rate limits"
)]
struct Cli {
    /// Log level or filter (e.g. "info", "fulcrum=debug"); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log line format, text (the default) or json (one object per line); wins over the
    /// config's `[log] format`.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        value_parser = PossibleValuesParser::new(LogFormat::NAMES)
            .try_map(|name| LogFormat::from_name(&name).ok_or("expected text or json")),
    )]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer from a TOML config file.
    Run {
        /// The TOML config file (re-read on SIGHUP).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file with the same code `run` uses; exit 0 if it is valid.
    Check {
        /// The TOML config file to validate, with every certificate file it names.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Judge a client certificate chain as a listener's handshake would: exit 0 accepted,
    /// 1 refused (with the reason), 2 usage or config error. Contacts nothing.
    Verify {
        /// The TOML config file whose listener judges.
        #[arg(long, short)]
        config: PathBuf,
        /// The listener (may be left out when one listener verifies client certificates).
        #[arg(long)]
        listener: Option<String>,
        /// Judge at this time instead of now (RFC 3339 UTC, e.g. 2026-12-07T12:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        at: Option<std::time::SystemTime>,
        /// The client's source address, for grants limited to networks (`from`).
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        /// The server name the client asks for (SNI), on listeners with several certificates.
        #[arg(long)]
        server_name: Option<String>,
        /// Print one JSON object instead of a line.
        #[arg(long)]
        json: bool,
        /// PEM file: the client's certificate first, then what the client would send.
        chain: PathBuf,
    },
    /// Run a demo backend that answers "Hello world from server NAME".
    Backend {
        /// Address to listen on, e.g. 127.0.0.1:8081.
        #[arg(long)]
        listen: SocketAddr,
        /// Name shown in the greeting: "Hello world from server NAME".
        #[arg(long)]
        name: String,
        /// Echo bytes back instead of answering HTTP.
        #[arg(long)]
        echo: bool,
    },
    /// Write a development PKI: a CA, a server certificate and one certificate per client.
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// A client identity to issue a certificate for (repeatable).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// An extra DNS name or IP for the server certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always included.
        #[arg(long = "server-name", value_name = "HOST")]
        server_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Talk to a running balancer's admin API: status, reload, and backend states.
    Ctl {
        /// The admin API's TCP address.
        #[arg(long, default_value = "127.0.0.1:9000", conflicts_with = "socket")]
        admin: SocketAddr,
        /// The admin API's Unix socket (`[admin] socket`) instead of TCP.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// A file holding the admin token (`[admin] token_file`).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Start three demo backends and an mTLS balancer on localhost; Ctrl-C stops.
    Demo {
        /// Address of the demo's mTLS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Address of the demo's admin listener (metrics).
        #[arg(long, default_value = "127.0.0.1:9000")]
        admin: SocketAddr,
    },
    /// Print the completion script for a shell (bash, zsh or fish) to stdout.
    Completions {
        /// The shell the script is for.
        shell: Shell,
    },
}

/// The shells `fulcrum completions` writes scripts for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `fulcrum man --out DIR`: writes the man pages (`fulcrum.1`, one per subcommand). Not part of
/// [`Cli`] but added to it for parsing only (see [`command_line`]), so that `--help`, the
/// completions and the man pages themselves leave it out.
#[derive(Args)]
struct Man {
    /// Directory to write the pages into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Listeners, upstreams and backends with their health, admin state and counts.
    Status,
    /// Re-read the config file and apply it (as SIGHUP).
    Reload,
    /// Take a backend out of rotation; its open connections go on.
    Drain { upstream: String, backend: String },
    /// Take a backend out of rotation and close its open connections.
    Maint { upstream: String, backend: String },
    /// Return a backend to rotation (if it is healthy).
    Ready { upstream: String, backend: String },
    /// Set a backend's weight (1 to 256) until a reload changes its configured weight.
    Weight {
        upstream: String,
        backend: String,
        weight: u32,
    },
    /// Refuse an identity (or a certificate serial) at admission and close its open connections,
    /// on every instance sharing the cluster's Redis; without an identity or --serial, list the
    /// quarantines in force.
    Quarantine {
        /// The client identity, exactly as logged.
        identity: Option<String>,
        /// A certificate serial instead (hex, colons optional).
        #[arg(long)]
        serial: Option<String>,
        /// How long (e.g. 30m, 1h, 7d; default 24h, at most 30d).
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
        /// Why, shown in the list and the refusals' log lines.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a quarantine (on every instance sharing the cluster's Redis).
    Release {
        /// The client identity, exactly as quarantined.
        identity: Option<String>,
        /// A certificate serial instead.
        #[arg(long)]
        serial: Option<String>,
    },
    /// List the open connections (every listener, plain and TLS): client, identity, backend,
    /// phase, age, idle time and bytes, filtered by the options given.
    Connections {
        #[command(flatten)]
        filter: ConnectionFilter,
        /// Print the API's JSON (every page in one object) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Close the open connections the options match (at least one), with a reset; the access log
    /// says closed_by_operator.
    Close {
        #[command(flatten)]
        filter: ConnectionFilter,
        /// Count the connections that would be closed; close none.
        #[arg(long)]
        dry_run: bool,
        /// Print the API's JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Preview a reload: which open mTLS connections the config file would close, per identity,
    /// listener and reason. Nothing is applied.
    Impact {
        /// The candidate config file; the balancer reads it, so it must be able to.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the API's JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// Which open connections `ctl connections` and `ctl close` mean: every option given must match.
#[derive(clap::Args)]
struct ConnectionFilter {
    /// The client identity, exactly as logged (mTLS).
    #[arg(long)]
    identity: Option<String>,
    /// The listener's name.
    #[arg(long)]
    listener: Option<String>,
    /// The backend's configured host:port, as /status shows it.
    #[arg(long)]
    backend: Option<String>,
    /// The client certificate's serial: hex, colons optional (as the access log writes it).
    #[arg(long)]
    serial: Option<String>,
}

impl From<ConnectionFilter> for fulcrum::ctl::ConnectionFilter {
    fn from(f: ConnectionFilter) -> Self {
        fulcrum::ctl::ConnectionFilter {
            identity: f.identity,
            listener: f.listener,
            backend: f.backend,
            serial: f.serial,
        }
    }
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let matches = command_line().get_matches();
    if let Some(("man", args)) = matches.subcommand() {
        return man(Man::from_arg_matches(args).unwrap_or_else(|e| e.exit()));
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Ctl {
        admin,
        socket,
        token_file,
        json,
        command,
    } = cli.command
    {
        return ctl(admin, socket, token_file, json, command);
    }
    if let Command::Verify {
        config,
        listener,
        at,
        from,
        server_name,
        json,
        chain,
    } = &cli.command
    {
        let question = fulcrum::verify::Question {
            listener: listener.as_deref(),
            server_name: server_name.as_deref(),
            from: *from,
            at: at.unwrap_or_else(std::time::SystemTime::now),
        };
        return verify(config, question, *json, chain);
    }
    // Kept until main returns: dropping it writes the log lines still queued. `run` starts logging
    // itself once it has read its config, whose `[log] format` applies.
    let _log = (!matches!(cli.command, Command::Run { .. }))
        .then(|| fulcrum::logging::init(&cli.log_level, cli.log_format.unwrap_or_default()));
    match run(cli.command, &cli.log_level, cli.log_format) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our messages usually carry their cause already: print each cause only once.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What `main` parses: [`Cli`] and the hidden `man`.
fn command_line() -> clap::Command {
    let man = clap::Command::new("man")
        .hide(true)
        .about("Write the man pages into a directory");
    Cli::command().subcommand(Man::augment_args(man))
}

/// `fulcrum man`: exit 0 when every page was written, 1 otherwise.
fn man(args: Man) -> std::process::ExitCode {
    let written =
        std::fs::create_dir_all(&args.out).and_then(|()| clap_mangen::generate_to(Cli::command(), &args.out));
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man pages to {}: {e}", args.out.display());
            std::process::ExitCode::FAILURE
        }
    }
}

/// `fulcrum completions SHELL`: the script, generated from [`Cli`], to stdout.
fn completions(shell: Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "fulcrum", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("cannot write the completion script")
}

/// `fulcrum ctl`: exit 0 on success, 1 when the admin API refused, 2 when it could not be reached.
fn ctl(
    admin: SocketAddr,
    socket: Option<PathBuf>,
    token_file: Option<PathBuf>,
    json: bool,
    command: CtlCommand,
) -> std::process::ExitCode {
    use fulcrum::ctl::{Command as Ask, Target};
    use fulcrum::health::AdminState;
    let target = socket.map_or(Target::Tcp(admin), Target::Socket);
    let json = json
        || matches!(
            command,
            CtlCommand::Impact { json: true, .. }
                | CtlCommand::Connections { json: true, .. }
                | CtlCommand::Close { json: true, .. }
        );
    let set = |upstream, backend, state| Ask::Set {
        upstream,
        backend,
        state,
    };
    let ask = match command {
        CtlCommand::Status => Ask::Status,
        CtlCommand::Reload => Ask::Reload,
        CtlCommand::Drain { upstream, backend } => set(upstream, backend, AdminState::Drain),
        CtlCommand::Maint { upstream, backend } => set(upstream, backend, AdminState::Maint),
        CtlCommand::Ready { upstream, backend } => set(upstream, backend, AdminState::Ready),
        CtlCommand::Weight {
            upstream,
            backend,
            weight,
        } => Ask::Weight {
            upstream,
            backend,
            weight,
        },
        CtlCommand::Impact { config, .. } => Ask::Impact { config },
        CtlCommand::Connections { filter, .. } => Ask::Connections {
            filter: filter.into(),
        },
        CtlCommand::Close { filter, dry_run, .. } => Ask::Close {
            filter: filter.into(),
            dry_run,
        },
        CtlCommand::Quarantine {
            identity: None,
            serial: None,
            duration: None,
            reason: None,
        } => Ask::Quarantines,
        CtlCommand::Quarantine {
            identity,
            serial,
            duration,
            reason,
        } => match subject(identity, serial) {
            Ok(subject) => Ask::Quarantine {
                subject,
                duration,
                reason,
            },
            Err(code) => return code,
        },
        CtlCommand::Release { identity, serial } => match subject(identity, serial) {
            Ok(subject) => Ask::Release { subject },
            Err(code) => return code,
        },
    };
    let outcome = match runtime(1) {
        Ok(runtime) => runtime.block_on(fulcrum::ctl::run(&target, token_file.as_ref(), &ask, json)),
        Err(e) => Err(fulcrum::ctl::CtlError::Unreachable(e.to_string())),
    };
    match outcome {
        Ok(text) => {
            println!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

/// What `ctl quarantine` or `ctl release` names: an identity or `--serial`, exactly one.
fn subject(
    identity: Option<String>,
    serial: Option<String>,
) -> Result<fulcrum::ctl::Subject, std::process::ExitCode> {
    match (identity, serial) {
        (Some(identity), None) => Ok(fulcrum::ctl::Subject::Identity(identity)),
        (None, Some(serial)) => Ok(fulcrum::ctl::Subject::Serial(serial)),
        _ => {
            eprintln!("error: name an identity or --serial HEX (exactly one)");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// `fulcrum verify`: exit 0 accepted, 1 refused, 2 when no verdict could be given.
fn verify(
    config: &std::path::Path,
    question: fulcrum::verify::Question<'_>,
    json: bool,
    chain: &std::path::Path,
) -> std::process::ExitCode {
    let verdict = fulcrum::Config::load(config)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            let chain = fulcrum::verify::read_chain(chain).map_err(|e| e.to_string())?;
            fulcrum::verify::judge(&config, question, &chain).map_err(|e| e.to_string())
        });
    match verdict {
        Ok(verdict) => {
            if json {
                println!("{}", serde_json::to_string(&verdict).unwrap_or_default());
            } else {
                println!("{}", verdict.line());
            }
            std::process::ExitCode::from(if verdict.accepted() { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The commands that log; `run` starts logging (`level`, `format` or else the config's) itself.
fn run(command: Command, level: &str, format: Option<LogFormat>) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => {
            let config = fulcrum::Config::load(&config)?;
            // With `source = "spiffe"`, the Workload API is asked for its material, as `run` does.
            let checked = match config.uses_spiffe() {
                true => runtime(1)?.block_on(fulcrum::check_connected(&config))?,
                false => fulcrum::check(&config)?,
            };
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            for line in checked.trust.iter().chain(&checked.policy) {
                println!("{line}");
            }
            // The earliest certificate deadline (CRLs are renewed on their own schedule).
            if let Some(first) = checked.certificates.iter().find(|c| c.kind != "crl_next_update") {
                println!(
                    "earliest certificate expiry: {} at {} ({} days left)",
                    first.describe(),
                    humantime::format_rfc3339_seconds(first.not_after),
                    first.days_left(std::time::SystemTime::now())
                );
            }
            println!(
                "{}: ok ({} listener(s), {} upstream(s))",
                config.origin,
                config.listeners.len(),
                config.upstreams.len()
            );
            Ok(())
        }
        Command::Run { config } => {
            let config = fulcrum::Config::load(&config)?;
            // Decided once: a reload does not change the log format.
            let _log = fulcrum::logging::init(level, format.unwrap_or(config.log.format));
            // Before the runtime's threads start: it unsets the socket activation variables.
            let activation = fulcrum::systemd::Activation::from_env()?;
            // With `scheduler = "per_worker"` only the server's control work runs here:
            // connections run on worker threads of the server's own, one runtime each.
            let threads = match config.scheduler {
                fulcrum::config::Scheduler::Shared => config.workers(),
                fulcrum::config::Scheduler::PerWorker => 1,
            };
            let ran = runtime(threads)?.block_on(async {
                let server = fulcrum::Server::bind_activated(config, activation).await?;
                reload_on_sighup(server.handle())?;
                server.run(shutdown_on_signal()?).await;
                Ok(())
            });
            // The runtime is gone by now: what its tasks logged is queued, and `_log` writes it.
            ran
        }
        Command::Certs {
            out,
            clients,
            server_names,
            force,
        } => {
            let pki = fulcrum::pki::generate(&clients, &server_names)?;
            for path in fulcrum::pki::write(&out, &pki, force)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Backend { listen, name, echo } => runtime(default_workers())?.block_on(async {
            let socket = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot bind {listen}"))?;
            let mode = if echo {
                fulcrum::backend::Mode::Echo
            } else {
                fulcrum::backend::Mode::Hello
            };
            tracing::info!(addr = %socket.local_addr()?, %name, ?mode, "demo backend listening");
            fulcrum::backend::serve(socket, name, mode, shutdown_on_signal()?).await;
            Ok(())
        }),
        // `main` answers `ctl` and `verify` itself, with their own exit codes, before it gets here.
        Command::Ctl { .. } | Command::Verify { .. } => anyhow::bail!("not run here"),
        Command::Completions { shell } => completions(shell),
        Command::Demo { listen, admin } => runtime(default_workers())?.block_on(async {
            let options = fulcrum::demo::DemoOptions { listen, admin };
            fulcrum::demo::run(options, shutdown_on_signal()?).await?;
            Ok(())
        }),
    }
}

/// One worker: a single-threaded runtime (no cross-thread hand-offs); more: a multi-threaded one.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Reloads the config file on every SIGHUP (the result is logged by the server).
/// SIGHUP reloads the configuration; SIGUSR1 reopens the access log file (logrotate).
fn reload_on_sighup(handle: fulcrum::reload::Handle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot install SIGUSR1 handler")?;
    let reopen = handle.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            reopen.state().reopen_access_log();
        }
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration");
            if handle.reload().await.is_err() {
                // Refused (and logged by the server), or the server has stopped.
                continue;
            }
        }
    });
    Ok(())
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A token cancelled by the first SIGINT or SIGTERM; a second one exits at once.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        // Cancel before logging: nothing (a broken log pipe included) may stand between the
        // signal and the shutdown.
        cancel.cancel();
        tracing::info!("signal received: shutting down (send again to exit at once)");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(1);
    });
    Ok(token)
}
