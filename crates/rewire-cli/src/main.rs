//! The `rewire` command: the one tool users and tests drive rewire with.

mod admin;
mod control;
mod daemon;
mod demo;
mod flows;
mod gen;
mod logging;
mod manage;
mod metrics;
mod notify;
mod printer;
mod probe;
mod proxy;
mod proxy_metrics;
mod readiness;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rewire_control::limiter::Limits;

/// rewire: chain local inspection proxies on Linux with WFP-style redirect records.
#[derive(Parser, Debug)]
#[command(name = "rewire", version, about, long_about = None)]
struct Cli {
    /// How rewire's own log lines are written on stderr: text (coloured
    /// only when stderr is a terminal) or one JSON object a line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a command under the hooks, in a fresh cgroup removed when it exits
    ///
    /// Creates a fresh cgroup, attaches the hooks, runs CMD inside and tears
    /// everything down when it exits.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// How to print the kernel's decisions on stderr.
        #[arg(long, value_enum, default_value_t = printer::EventFormat::Text)]
        events: printer::EventFormat,
        #[command(flatten)]
        limits: EventLimits,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Attach the hooks to a cgroup for good and serve them
    ///
    /// Attaches the hooks to the config's cgroup (pinned: they outlive the
    /// daemon) or adopts those a previous daemon left, and serves: prints the
    /// kernel's decisions, answers its control socket
    /// /run/rewire/CGROUP.sock (`rewire status`, `reload`, `log-level`; root
    /// and the config's `control_group` only), reloads the config file it
    /// was started with on SIGHUP. SIGINT/SIGTERM stop the daemon
    /// and leave the hooks enforcing and the processes inside running; use
    /// `rewire down` to remove everything.
    Daemon {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// How to print the kernel's decisions on stderr.
        #[arg(long, value_enum, default_value_t = printer::EventFormat::Text)]
        events: printer::EventFormat,
        #[command(flatten)]
        limits: EventLimits,
        /// Replace the attached programs with this build's (atomic link
        /// update) even when they are the same build and configuration
        /// (otherwise they are kept as they are).
        #[arg(long)]
        replace_programs: bool,
        /// Serve Prometheus metrics (the kernel's counters by service and
        /// cause, reloads, generation) at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Show a daemon's hooks, its process and the kernel's counters
    ///
    /// Shows whether a daemon's hooks are attached, its live daemon, and the
    /// kernel's per-cause counters (every redirect and refusal, counted even
    /// when events are dropped or not printed). Asks the daemon on its
    /// control socket; when it does not answer, reads the pinned maps
    /// itself and says why the daemon is not reachable. Exits 0 when the hooks (and
    /// the configured guard) are attached, 3 when they are not, 1 on error.
    Status {
        /// Configuration file the daemon was started with.
        #[arg(long, short)]
        config: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Wait until the hooks are attached (a readiness check: a daemon
        /// that is starting); after --timeout, one line says why not and the
        /// exit code is 3.
        #[arg(long)]
        wait: bool,
        /// Seconds --wait waits at most.
        #[arg(long, value_name = "SECS", default_value_t = 30.0, requires = "wait")]
        timeout: f64,
    },
    /// List the live redirected flows, read from the kernel
    ///
    /// Each flow the daemon's hooks redirected whose sockets are still open:
    /// its id, protocol, origin (pid, command, uid), original destination,
    /// the services that handled it so far and its age, read from the
    /// kernel's per-socket state with a BPF iterator (root only). --watch
    /// prints each flow as it starts and as it ends.
    Flows {
        /// Configuration file the daemon was started with.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON (one array; with --watch one object a line).
        #[arg(long)]
        json: bool,
        /// Follow: print flows as they start and end, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Apply a changed configuration to the running daemon atomically
    ///
    /// Applies a changed configuration (services, rules) to the running
    /// daemon atomically, through its control socket; an invalid one is
    /// refused and the running one stays. The answer is this request's own:
    /// exit 0 when it was applied, 1 with the daemon's reason when refused.
    Reload {
        /// Configuration file (its `cgroup` names the daemon).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show or change a running daemon's log filter
    ///
    /// Asks the daemon on its control socket for its log filter, or sets
    /// it (takes effect at once, until the daemon stops or it is set again):
    /// `debug` while diagnosing, `info` after. FILTER is `$REWIRE_LOG`'s
    /// syntax, e.g. `debug` or `info,rewire_control=trace`.
    LogLevel {
        /// Configuration file the daemon was started with (its `cgroup` names the daemon).
        #[arg(long, short)]
        config: PathBuf,
        /// The new filter; without it, the current one is printed.
        filter: Option<String>,
    },
    /// Take a daemon's subtree down: processes, cgroup, hooks and pins
    ///
    /// Takes a daemon's subtree down on purpose: stops the daemon, sends the
    /// processes inside SIGTERM (SIGKILL after --grace), removes the cgroup,
    /// detaches the hooks and removes the pins.
    Down {
        /// Configuration file the daemon was started with.
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds the processes inside get between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10.0)]
        grace: f64,
    },
    /// Run a command inside a daemon's cgroup, optionally as a service
    ///
    /// Runs CMD inside the cgroup of a `rewire daemon` (refused unless its
    /// hooks are attached) or of the `rewire run` it is started from,
    /// optionally as one of its services.
    Exec {
        /// Configuration file the daemon was started with (default: $REWIRE_CONFIG).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run CMD as service NAME: in the service's cgroup, so the service's
        /// flows reach the sockets it listens on and its record-less onward
        /// connects continue the chain after it (an unmodified proxy).
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Run the reference inspection proxy for one service.
    Proxy(proxy::ProxyArgs),
    /// Show chained proxies at work (needs root)
    ///
    /// Shows chained proxies at work: audit then dlp in front of a local
    /// HTTP server, then loop protection.
    Demo(demo::DemoArgs),
    /// Connect somewhere and report what happened, as JSON
    ///
    /// A test and diagnosis client: connects (or sends datagrams) and
    /// reports what happened as one JSON object.
    Probe(probe::ProbeArgs),
    /// Write the man pages or a shell's completions (for packagers)
    Gen(gen::GenArgs),
}

/// Rate limits of the event lines.
#[derive(clap::Args, Debug)]
struct EventLimits {
    /// At most this many event lines per second per process and event kind;
    /// the rest are summarised once a second ("suppressed N ... events from
    /// COMMAND (pid P, uid U)").
    #[arg(long, value_name = "N", default_value_t = Limits::default().lines_per_origin)]
    event_lines: u32,
    /// At most this many event lines per second in all.
    #[arg(long, value_name = "N", default_value_t = Limits::default().lines_total)]
    event_lines_total: u32,
}

impl EventLimits {
    fn limits(&self) -> Limits {
        Limits { lines_per_origin: self.event_lines, lines_total: self.event_lines_total, ..Limits::default() }
    }
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format == LogFormat::Json);
    let json_log = cli.log_format == LogFormat::Json;
    let result = match cli.cmd {
        Cmd::Run { config, events, limits, cmd } => run::run(&config, events, limits.limits(), &cmd),
        Cmd::Daemon { config, events, limits, replace_programs, metrics } => {
            daemon::daemon(&config, events, limits.limits(), replace_programs, metrics).map(|()| 0)
        }
        Cmd::Status { config, json, wait, timeout } => {
            admin::status(&config, json, wait.then(|| std::time::Duration::from_secs_f64(timeout.clamp(0.0, 86400.0))))
        }
        Cmd::Flows { config, json, watch } => flows::flows(&config, json, watch),
        Cmd::Reload { config } => admin::reload(&config).map(|()| 0),
        Cmd::LogLevel { config, filter } => admin::log_level(&config, filter).map(|()| 0),
        Cmd::Down { config, grace } => admin::down(&config, std::time::Duration::from_secs_f64(grace.clamp(0.0, 3600.0))).map(|()| 0),
        Cmd::Exec { config, service, cmd } => admin::exec(config.as_deref(), service.as_deref(), &cmd),
        Cmd::Proxy(a) => proxy::main(a).map(|()| 0),
        Cmd::Demo(a) => demo::main(a).map(|()| 0),
        Cmd::Probe(a) => probe::main(a).map(|()| 0),
        Cmd::Gen(a) => gen::main(a).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if json_log {
                tracing::error!("{e:#}");
            } else {
                eprintln!("rewire: error: {e:#}");
            }
            std::process::exit(1);
        }
    }
}
