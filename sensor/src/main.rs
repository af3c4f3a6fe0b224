//! `keywarden`: an eBPF sensor that names the key behind every private-key
//! signature on a Linux host.
//!
//! Data flows one way: probes (`probes`, kernel programs in `ebpf-probes/`)
//! → decode (`records`) → enrich (`enrich`, `keys`) → events
//! (`keywarden-analyzer`) → sinks (`sink`).

mod analyze;
mod clock;
mod compact;
mod config;
mod control;
mod coverage;
mod discovery;
mod enforce;
mod enrich;
mod free_watch;
mod held;
mod host;
mod keys;
mod lake;
mod liveness;
mod logging;
mod metrics;
mod pidfd;
mod probes;
mod records;
mod remediate;
mod respond;
mod rotate;
mod run;
mod secrets;
mod setup;
mod sink;
mod watchdog;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
};

use clap::{Parser, Subcommand};

/// Events cross threads (ring reader → pipeline shards → sinks) and are
/// freed on a thread other than the one that allocated them; under glibc
/// malloc that contended on arena locks and cost one pipeline shard 38% of
/// its throughput (`benches/pipeline_throughput.rs`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keywarden", version, about = "Watches every use of a private key on this host", long_about = None)]
struct Cli {
    /// Log filter for stderr (tracing syntax, e.g. `info`, `keywarden=debug`).
    #[arg(long, global = true, default_value = "info", env = "KEYWARDEN_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sensor in the foreground: NDJSON events to stdout (or
    /// --output), logs to stderr. SIGINT or SIGTERM detaches, flushes and
    /// exits 0, or 3 if events were shed under load during the run.
    Run {
        /// Configuration file (YAML). Without it the embedded default is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Write events to this file (appended) instead of stdout.
        #[arg(long, short)]
        output: Option<String>,
        /// Never stop a process to attach to a library it just opened.
        #[arg(long)]
        no_hold: bool,
        /// Rule file or directory (repeatable); added to the configuration's
        /// `rules`. SIGHUP reloads them.
        #[arg(long, value_name = "PATH")]
        rules: Vec<String>,
        /// Baseline file (overrides `analyzer.baselines`; the last one given
        /// wins).
        #[arg(long, value_name = "FILE", overrides_with = "baselines")]
        baselines: Option<String>,
        /// Serve Prometheus metrics at GET /metrics on this IP address and
        /// port, e.g. 127.0.0.1:9464 (overrides `metrics`; off by default).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Key inventory file (overrides `inventory`; the last one given
        /// wins).
        #[arg(long, value_name = "FILE", overrides_with = "inventory")]
        inventory: Option<String>,
        /// Output format: ndjson (default), compact (one readable line per
        /// event) or none (with --parquet: Parquet only). Overrides `format`.
        #[arg(long, value_enum)]
        format: Option<sink::Format>,
        /// Also write Parquet files in the Amazon Security Lake layout under
        /// DIR (overrides `parquet.dir`; docs/deploy.md).
        #[arg(long, value_name = "DIR")]
        parquet: Option<String>,
    },
    /// Replay recorded NDJSON events through the same pipeline and rules as
    /// the live sensor; writes the findings as NDJSON.
    Analyze {
        /// Recorded events (`keywarden run` output); `-` for stdin.
        #[arg(long, short)]
        input: String,
        /// Configuration whose `rules` and `analyzer` settings apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_name = "PATH")]
        rules: Vec<String>,
        /// Start from these baselines (read only; never written).
        #[arg(long, value_name = "FILE")]
        baselines: Option<String>,
        /// Findings go here (appended) instead of stdout.
        #[arg(long, short)]
        output: Option<String>,
    },
    /// The key inventory the sensor keeps: every key seen, with its
    /// algorithm, the files and certificates that hold it, the processes
    /// that signed with it, how often and when. Keys nothing signed with
    /// show as unused. Reads the file the sensor writes: no probes, and no
    /// root if the file is readable.
    Keys {
        /// JSON (docs/keys.md) instead of a table.
        #[arg(long)]
        json: bool,
        /// Inventory file (default: the configuration's `inventory`).
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
        /// Configuration whose `inventory` applies.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Replace a key where it is used: plan from the inventory, issue a new
    /// key and certificate (local CA or ACME), install them atomically,
    /// reload the service, verify by handshake that it presents the new
    /// key, and roll back when any step fails (docs/rotation.md). First
    /// finishes or rolls back any rotation a crash interrupted. Exit
    /// status: 0 done, 1 refused or error, 2 rolled back, 3 rollback failed.
    Rotate {
        /// The key's SPKI SHA-256 (or an unambiguous prefix, 8+ digits).
        #[arg(
            long,
            required_unless_present_any = ["resume", "keys", "issuer", "all_expiring_before"],
            conflicts_with_all = ["keys", "issuer", "all_expiring_before"]
        )]
        key: Option<String>,
        /// Bulk: every key listed in FILE (one SPKI per line, `#` comments).
        #[arg(long, value_name = "FILE", group = "bulk")]
        keys: Option<PathBuf>,
        /// Bulk: every key with a certificate from this issuer (as
        /// `keywarden keys` prints it).
        #[arg(long, value_name = "DN", group = "bulk")]
        issuer: Option<String>,
        /// Bulk: every key with a certificate expiring before this day
        /// (YYYY-MM-DD, UTC).
        #[arg(long, value_name = "DATE", group = "bulk")]
        all_expiring_before: Option<String>,
        /// Bulk: services rotated side by side (keys of one service are
        /// rotated one after the other).
        #[arg(long, default_value_t = 4, requires = "bulk")]
        concurrency: usize,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only finish or roll back interrupted rotations.
        #[arg(long, conflicts_with = "key")]
        resume: bool,
        /// Algorithm of the new key (`ecdsa-p256`, `ecdsa-p384`, `ed25519`,
        /// `rsa-2048`...); default: the old key's.
        #[arg(long)]
        algorithm: Option<String>,
        /// Issuer: `local` or `acme` (over `rotation.issuer`).
        #[arg(long)]
        ca: Option<String>,
        /// The running sensor's events file: also verify by what the
        /// sensor sees sign (over `rotation.sensor_events`).
        #[arg(long, value_name = "FILE")]
        sensor_events: Option<String>,
        /// Drain period for old workers, ms (over `rotation.drain_ms`).
        #[arg(long, value_name = "MS")]
        drain_ms: Option<u64>,
        /// Inventory file (default: the configuration's `inventory`).
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Revoke every certificate of a key at the CA that issued it (the
    /// local CA's CRL, or ACME revokeCert) and verify at the CA that it is
    /// revoked (docs/rotation.md). A key that still serves is refused
    /// unless a rotation replaced it or --force is given.
    Revoke {
        /// The key's SPKI SHA-256 (or an unambiguous prefix known to the
        /// inventory).
        #[arg(long)]
        key: String,
        /// RFC 5280 reason: keyCompromise, superseded, cessationOfOperation,
        /// affiliationChanged, cACompromise, privilegeWithdrawn, unspecified...
        #[arg(long)]
        reason: String,
        /// Revoke even though the key still serves.
        #[arg(long)]
        force: bool,
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Actions of rules (`rotate`, `revoke`) awaiting an operator:
    /// list them, approve one (the running sensor carries it out) or
    /// reject it.
    Actions {
        #[command(subcommand)]
        command: ActionsCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// List or reset learned baselines.
    Baseline {
        #[command(subcommand)]
        command: BaselineCommand,
    },
    /// Work with rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Which files hold signing code and which stacks the probes would
    /// see in them, without loading any probe: every program and shared
    /// object mapped by a running process plus the configured library
    /// directories, or only the files given. Files with crypto code that
    /// cannot be probed (stripped) are listed as NOT covered; exits 2 if
    /// there is any.
    Coverage {
        /// Files to examine instead of the host.
        paths: Vec<PathBuf>,
        /// Configuration whose `library_dirs` apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object per file instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the embedded default configuration.
    Config,
    /// Internal: started by `run` itself, releases the processes it held
    /// once it exits, however it exits (`watchdog.rs`).
    #[command(name = "__watchdog", hide = true)]
    Watchdog,
}

#[derive(Subcommand)]
enum ActionsCommand {
    /// One line per action: id, state, steps, key, rule, finding.
    List,
    /// Let the running sensor carry out a pending action.
    Approve { id: String },
    /// Drop a pending action; its key is free for rules again.
    Reject { id: String },
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// One line per key: uses, first and last use, what it was used from.
    List {
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/var/lib/keywarden/baselines.json"
        )]
        file: PathBuf,
    },
    /// Forget a key's baseline (it learns again from its next use), or all.
    /// Stop the sensor first: it rewrites the file every minute.
    Reset {
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/var/lib/keywarden/baselines.json"
        )]
        file: PathBuf,
        /// The key's SPKI SHA-256.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        key: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate rule files (or directories of *.yaml): every error is
    /// printed as file:line:column; exits 1 if there is any.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywarden: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        // Escaped (no forged lines), so without colours: an escape code
        // is a control character like any other.
        .with_writer(|| logging::EscapedStderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    match cli.command {
        Command::Config => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Watchdog => exit(watchdog::run()),
        Command::Rules {
            command: RulesCommand::Check { paths },
        } => match keywarden_analyzer::rules::RuleSet::load(&paths) {
            Ok(set) => {
                println!("{} rules in {} files: OK", set.rules.len(), set.files.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("keywarden: error: {} problems in rules", e.0.len());
                ExitCode::FAILURE
            }
        },
        Command::Coverage {
            paths,
            config,
            json,
        } => match coverage::report(&paths, config.as_deref(), json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("keywarden: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Analyze {
            input,
            config,
            rules,
            baselines,
            output,
        } => exit(analyze::run(analyze::Args {
            input,
            config,
            rules,
            baselines,
            output,
        })),
        Command::Keys {
            json,
            inventory,
            config,
        } => exit((|| {
            let path = match inventory {
                Some(p) => p,
                None => PathBuf::from(config::Config::load(config.as_deref())?.inventory),
            };
            keys::inventory::print(&path, json)
        })()),
        Command::Rotate {
            key,
            keys,
            issuer,
            all_expiring_before,
            concurrency,
            dry_run,
            resume,
            algorithm,
            ca,
            sensor_events,
            drain_ms,
            inventory,
            config,
        } => {
            let r = config::Config::load(config.as_deref()).and_then(|mut cfg| {
                if sensor_events.is_some() {
                    cfg.rotation.sensor_events = sensor_events;
                }
                if let Some(d) = drain_ms {
                    cfg.rotation.drain_ms = d;
                }
                let selection = match (keys, issuer, all_expiring_before) {
                    (Some(f), _, _) => Some(rotate::bulk::Selection::Keys(f)),
                    (_, Some(dn), _) => Some(rotate::bulk::Selection::Issuer(dn)),
                    (_, _, Some(d)) => Some(rotate::bulk::Selection::ExpiringBefore(
                        rotate::bulk::parse_date(&d)?,
                    )),
                    _ => None,
                };
                if let Some(selection) = selection {
                    return rotate::bulk::run(
                        &cfg,
                        rotate::bulk::Args {
                            selection,
                            concurrency,
                            dry_run,
                            algorithm,
                            ca,
                            inventory,
                        },
                    );
                }
                rotate::run(
                    &cfg,
                    rotate::Args {
                        key,
                        dry_run,
                        resume,
                        algorithm,
                        ca,
                        inventory,
                    },
                )
                .map(|o| o.exit_code())
            });
            match r {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("keywarden: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Revoke {
            key,
            reason,
            force,
            inventory,
            config,
        } => exit(config::Config::load(config.as_deref()).and_then(|cfg| {
            rotate::revoke::run(
                &cfg,
                rotate::revoke::Args {
                    key,
                    reason,
                    force,
                    inventory,
                },
            )
        })),
        Command::Actions { command, config } => exit((|| {
            let cfg = config::Config::load(config.as_deref())?;
            let store = remediate::approvals::Store::open(std::path::Path::new(
                &cfg.remediation.approvals_dir,
            ))?;
            use remediate::approvals::State;
            match command {
                ActionsCommand::List => remediate::approvals::print_list(&store),
                ActionsCommand::Approve { id } => {
                    let r = store.transition(&id, State::Pending, State::Approved)?;
                    println!(
                        "approved {}: the running sensor carries it out; its outcome is a \
                         Remediation Activity event correlated with finding {}",
                        r.id, r.finding_uid
                    );
                    Ok(())
                }
                ActionsCommand::Reject { id } => {
                    let r = store.transition(&id, State::Pending, State::Rejected)?;
                    println!("rejected {}", r.id);
                    Ok(())
                }
            }
        })()),
        Command::Baseline { command } => exit(match command {
            BaselineCommand::List { file } => analyze::list_baselines(&file),
            BaselineCommand::Reset { file, key, all } => {
                analyze::reset_baselines(&file, if all { None } else { key.as_deref() })
            }
        }),
        Command::Run {
            config,
            output,
            no_hold,
            rules,
            baselines,
            metrics,
            inventory,
            format,
            parquet,
        } => {
            let result = (|| {
                let mut cfg = config::Config::load(config.as_deref())?;
                cfg.rules.extend(rules);
                if let Some(b) = baselines {
                    cfg.analyzer.baselines = b;
                }
                if let Some(i) = inventory {
                    cfg.inventory = i;
                }
                if let Some(o) = output {
                    cfg.output = o;
                }
                if no_hold {
                    cfg.hold_new_libraries = false;
                }
                if let Some(m) = metrics {
                    cfg.metrics = Some(m);
                }
                if let Some(f) = format {
                    cfg.format = f;
                }
                if let Some(d) = parquet {
                    cfg.parquet.dir = Some(d);
                }
                let shutdown = Arc::new(AtomicBool::new(false));
                for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                    signal_hook::flag::register(sig, shutdown.clone())?;
                }
                let reload = Arc::new(AtomicBool::new(false));
                signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
                run::run(cfg, shutdown, reload)
            })();
            match result {
                Ok(run::Outcome::Complete) => ExitCode::SUCCESS,
                // Stopped as asked, but not everything was reported: say
                // so in the status too, for whoever supervises the sensor.
                Ok(run::Outcome::Shed(shed)) => {
                    eprintln!(
                        "keywarden: {} events were shed during this run ({}); exit status {}",
                        shed.total(),
                        shed.causes(),
                        run::shedding::EXIT_SHED
                    );
                    ExitCode::from(run::shedding::EXIT_SHED)
                }
                Err(e) => {
                    eprintln!("keywarden: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_a_metrics_address() {
        let cli = Cli::try_parse_from(["keywarden", "run", "--metrics", "127.0.0.1:9464"]).unwrap();
        assert!(
            matches!(cli.command, Command::Run { metrics: Some(m), .. } if m == "127.0.0.1:9464")
        );
    }

    #[test]
    fn run_takes_a_format_and_a_parquet_directory() {
        let cli = Cli::try_parse_from([
            "keywarden",
            "run",
            "--format",
            "compact",
            "--parquet",
            "/var/lib/keywarden/lake",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Run { format: Some(sink::Format::Compact), parquet: Some(d), .. }
                if d == "/var/lib/keywarden/lake"
        ));
        assert!(Cli::try_parse_from(["keywarden", "run", "--format", "xml"]).is_err());
    }

    #[test]
    fn the_watchdog_command_parses_as_run_starts_it() {
        let cli = Cli::try_parse_from(["keywarden", "--log", "debug", watchdog::COMMAND]).unwrap();
        assert!(matches!(cli.command, Command::Watchdog));
    }

    #[test]
    fn keys_takes_an_inventory_path_and_json() {
        let cli =
            Cli::try_parse_from(["keywarden", "keys", "--json", "--inventory", "/tmp/i.json"])
                .unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys { json: true, inventory: Some(p), config: None } if p.as_os_str() == "/tmp/i.json"
        ));
        let cli = Cli::try_parse_from([
            "keywarden",
            "run",
            "--inventory",
            "/a.json",
            "--inventory",
            "/b.json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Run { inventory: Some(p), .. } if p == "/b.json"
        ));
    }
}
