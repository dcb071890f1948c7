//! `aether`: the thin control plane (`aether serve`) and the user CLI.

mod api;
mod checked;
mod client;
mod cluster;
mod dev;
mod install;
mod keys;
mod known;
mod lease;
mod live;
mod local;
mod logs;
mod metrics;
mod pack;
mod publish;
mod reconcile;
mod serve;
mod snapshot;
mod status;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::api::DeployRequest;
use crate::client::{Client, ClientArgs};
use crate::dev::Output;
use crate::publish::{FormatArg, Publisher};

/// Exit codes, documented in the README.
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "aether",
    version,
    about = "Hot reload into Kubernetes: control plane and CLI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: artifact store, deploy and release API, reconcile loop.
    Serve(serve::ServeArgs),
    /// Pack (or read) a release, sign it when a key is configured, upload it, and create or
    /// update the app's Deployment.
    Deploy {
        app: String,
        /// Source directory or a ready `.tar.gz` (default: current directory).
        #[arg(default_value = ".")]
        source: PathBuf,
        /// Run the aether-fetcher sidecar so later releases go live without a rollout.
        #[arg(long)]
        dev_hot: bool,
        #[arg(long, short = 'n', env = "AETHER_NAMESPACE")]
        namespace: Option<String>,
        /// App image (it runs the code from /workspace/current).
        #[arg(long, default_value = "busybox:stable")]
        image: String,
        #[arg(long, default_value_t = 1)]
        replicas: i32,
        /// --dev-hot: what a new release does to the running app: `restart`, `signal:<SIG>`
        /// (for example `signal:HUP`: the app keeps its process and reloads) or `none` (it
        /// watches its files itself). Such apps must read code through /workspace/current.
        #[arg(long, requires = "dev_hot")]
        on_release: Option<aether_common::contract::on_release::OnRelease>,
        /// How the release travels: a manifest (only files the store lacks are uploaded)
        /// or one tar.gz. A `.tar.gz` source is always sent as is.
        #[arg(long, value_enum, default_value = "manifest")]
        format: FormatArg,
        #[command(flatten)]
        expiry: ExpiryArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// App command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Watch a directory and hot-reload every change into the app's pods; with --local,
    /// into CMD run on this machine, no cluster.
    Dev {
        /// Hot reload (required: the only mode today).
        #[arg(long, required = true)]
        hot: bool,
        /// Run the whole loop on this machine: store, fetcher and supervisor; no cluster.
        #[arg(long)]
        local: bool,
        /// The app name, then the directory (with --local: only the directory).
        #[arg(num_args = 0..=2)]
        targets: Vec<String>,
        /// --local: where the store, annotations file and workspace live (default: a temp dir).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// --local: seconds between SIGTERM and SIGKILL when restarting the app.
        #[arg(long, env = "AETHER_SUPERVISOR_GRACE_SEC", default_value_t = 3)]
        grace_sec: u64,
        /// --local: the app command.
        #[arg(last = true)]
        command: Vec<String>,
        /// --local: show the fetcher's and the supervisor's info logs (by default only
        /// their warnings and errors appear beside the app's output).
        #[arg(long, short = 'v', requires = "local")]
        verbose: bool,
        /// --local: after each restart, poll this URL until the app answers (any status
        /// below 500) and report save → app ready instead of save → process started.
        #[arg(long, conflicts_with = "ready_port", requires = "local")]
        ready_url: Option<reqwest::Url>,
        /// --local: the same as --ready-url http://127.0.0.1:PORT/ (PORT defaults to 8080,
        /// the example apps' port).
        #[arg(long, num_args = 0..=1, default_missing_value = "8080", requires = "local")]
        ready_port: Option<u16>,
        #[arg(long, short = 'n', env = "AETHER_NAMESPACE")]
        namespace: Option<String>,
        /// How releases travel: a manifest (only changed files are uploaded) or one tar.gz.
        #[arg(long, value_enum, default_value = "manifest")]
        format: FormatArg,
        /// Push the tree once, wait until every pod runs it, and exit: 0 when all do, 1
        /// with the refusals (or the pods still pending after 60 s). For CI and scripts.
        #[arg(long, conflicts_with = "local")]
        once: bool,
        /// Do not stream the app's logs (by default every pod's app container output is
        /// shown between the sync lines, new pods joining).
        #[arg(long, conflicts_with = "local")]
        no_logs: bool,
        /// End the loop with exit code 1 at the first release a pod refuses.
        #[arg(long, conflicts_with = "local")]
        exit_on_failure: bool,
        /// `json`: one JSON object per event on stdout (watching, release, live per pod,
        /// refused, settled, superseded, timeout, error).
        #[arg(
            long,
            short = 'o',
            value_enum,
            default_value = "text",
            conflicts_with = "local"
        )]
        output: Output,
        #[command(flatten)]
        expiry: ExpiryArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Make an earlier release desired again: by default the one before the current, or
    /// --to DIGEST. A manifest release comes back as a new manifest (new seq, same files).
    Rollback {
        app: String,
        /// The release to go back to (`sha256:<hex>`).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, short = 'n', env = "AETHER_NAMESPACE")]
        namespace: Option<String>,
        #[command(flatten)]
        expiry: ExpiryArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Desired digest and, per pod, the annotated and live digest.
    Status {
        app: String,
        #[arg(long, short = 'n', env = "AETHER_NAMESPACE")]
        namespace: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
        /// Watch: print the status again whenever it changes (read every second) until
        /// interrupted; with `-o json`, one compact object per change.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// The app container's output of every pod of the app, each line prefixed with its pod.
    Logs {
        app: String,
        /// Keep printing new lines, and lines of pods that start later.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only lines newer than this (e.g. `10m`, `1h`).
        #[arg(long, value_parser = parse_duration)]
        since: Option<jiff::SignedDuration>,
        /// Only the last N lines of each pod.
        #[arg(long)]
        tail: Option<u32>,
        #[arg(long, short = 'n', env = "AETHER_NAMESPACE")]
        namespace: Option<String>,
    },
    /// Print the installation of the control plane as YAML, for `| kubectl apply
    /// --server-side -f -` (or, with --monitoring, the Prometheus Operator objects).
    Install(install::InstallArgs),
    /// Create an Ed25519 key pair: DIR/aether.key (seed, 0600) and DIR/aether.pub.
    Keygen {
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Print the signature of a digest (`sha256:<hex>`).
    Sign {
        digest: String,
        #[command(flatten)]
        key: KeyArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct ExpiryArgs {
    /// Manifests expire this long after they are made (e.g. `24h`, `30m`): a pod refuses
    /// an expired release (`expired`), which bounds how long a held-back release can be
    /// replayed to a pod with no history.
    #[arg(long, env = "AETHER_EXPIRES_IN", value_parser = parse_duration)]
    expires_in: Option<jiff::SignedDuration>,
}

#[derive(Debug, Clone, clap::Args)]
struct KeyArgs {
    /// File holding the signing seed (64 hex); AETHER_SIGNING_KEY otherwise.
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long, env = "AETHER_SIGNING_KEY", hide_env_values = true, hide = true)]
    signing_key: Option<String>,
}

impl KeyArgs {
    fn load(&self) -> anyhow::Result<Option<aether_common::SigningKey>> {
        keys::signing_key(self.key_file.as_deref(), self.signing_key.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    if let Err(e) = check_usage(&cli) {
        let _ = e.print();
        return ExitCode::from(EXIT_USAGE);
    }
    aether_common::logging::init(aether_common::logging::LogFormat::Text);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aether: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aether: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn parse_duration(s: &str) -> Result<jiff::SignedDuration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration such as 24h or 30m: {e}"))?;
    if d.is_positive() {
        Ok(d)
    } else {
        Err(format!("{s:?} must be positive"))
    }
}

/// Combinations clap cannot express, refused as usage errors before anything is done.
fn check_usage(cli: &Cli) -> Result<(), clap::Error> {
    use clap::CommandFactory;
    if let Command::Deploy {
        dev_hot: true,
        command,
        app,
        ..
    } = &cli.command
        && command.is_empty()
    {
        return Err(Cli::command().error(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!(
                "--dev-hot needs the app's command: aether deploy {app} DIR --dev-hot -- CMD…\n\
                 The app runs under the supervisor, which restarts it in each new release; \
                 without it the app would keep running the first release while its files \
                 are pruned under it."
            ),
        ));
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                if let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                    token.cancel();
                }
            });
            serve::run(args, shutdown).await
        }
        Command::Deploy {
            app,
            source,
            dev_hot,
            namespace,
            image,
            replicas,
            on_release,
            format,
            expiry,
            key,
            command,
        } => {
            let client = Client::new(&cli.client)?;
            let mut publisher = Publisher::new(app.clone(), namespace.clone(), key.load()?, format);
            publisher.expires_in = expiry.expires_in;
            let prepared = publisher
                .prepare(&client, &source, None)
                .await?
                .context("nothing to release")?;
            let request = DeployRequest {
                namespace,
                image,
                command,
                dev_hot,
                replicas,
                on_release: on_release.map(|o| o.to_string()),
                release: prepared.request,
            };
            let done = client.deploy(&app, &request).await?;
            println!(
                "deployed {app} {} ({} files, {} blobs {} uploaded){}",
                done.digest,
                prepared.files,
                prepared.sent_blobs,
                dev::human_bytes(prepared.sent_bytes),
                if dev_hot { " with dev-hot" } else { "" }
            );
            Ok(())
        }
        Command::Dev {
            hot: _,
            local,
            targets,
            work_dir,
            grace_sec,
            command,
            verbose,
            ready_url,
            ready_port,
            namespace,
            format,
            once,
            exit_on_failure,
            no_logs,
            output,
            expiry,
            key,
        } => {
            if local {
                let dir = match targets.as_slice() {
                    [] => PathBuf::from("."),
                    [dir] => PathBuf::from(dir),
                    _ => anyhow::bail!(
                        "with --local give only the directory: aether dev --hot --local DIR -- CMD…"
                    ),
                };
                return local::run(local::LocalArgs {
                    dir,
                    command,
                    work: work_dir,
                    grace_sec,
                    format,
                    verbose,
                    ready_url: match ready_port {
                        Some(port) => Some(format!("http://127.0.0.1:{port}/").parse()?),
                        None => ready_url,
                    },
                })
                .await;
            }
            let (app, dir) = match targets.as_slice() {
                [app] => (app.clone(), PathBuf::from(".")),
                [app, dir] => (app.clone(), PathBuf::from(dir)),
                _ => anyhow::bail!("usage: aether dev --hot APP [DIR]  (or --local [DIR] -- CMD…)"),
            };
            let client = Client::new(&cli.client)?;
            let mut publisher = Publisher::new(app, namespace, key.load()?, format);
            publisher.expires_in = expiry.expires_in;
            dev::DevLoop {
                client,
                dir,
                publisher,
                once,
                exit_on_failure,
                output,
                logs: !no_logs,
            }
            .run()
            .await
        }
        Command::Rollback {
            app,
            to,
            namespace,
            expiry,
            key,
        } => {
            let client = Client::new(&cli.client)?;
            let to = to
                .map(|d| d.parse::<aether_common::Digest>())
                .transpose()
                .context("--to")?;
            let mut publisher =
                Publisher::new(app.clone(), namespace, key.load()?, FormatArg::Manifest);
            publisher.expires_in = expiry.expires_in;
            let digest = publish::rollback(&client, &publisher, to).await?;
            println!("rolled {app} back: desired release is now {digest}");
            Ok(())
        }
        Command::Status {
            app,
            namespace,
            output,
            watch,
        } => {
            let client = Client::new(&cli.client)?;
            if watch {
                return status::watch(&client, &app, namespace.as_deref(), output).await;
            }
            let status = client.status(&app, namespace.as_deref()).await?;
            print!("{}", status::render(&status, output, false)?);
            Ok(())
        }
        Command::Logs {
            app,
            follow,
            since,
            tail,
            namespace,
        } => {
            let client = Client::new(&cli.client)?;
            let q = logs::LogQuery {
                namespace: None,
                follow,
                // Whole seconds, rounded up: `--since 1500ms` keeps the last 2 s.
                since_seconds: since.map(|d| d.as_secs() + i64::from(d.subsec_nanos() > 0)),
                tail_lines: tail.map(i64::from),
            };
            logs::print(&client, &app, namespace.as_deref(), &q).await
        }
        Command::Install(args) => {
            print!("{}", install::render(&args)?);
            Ok(())
        }
        Command::Keygen { out } => {
            let (seed, public) = keys::keygen(&out)?;
            println!(
                "wrote {} (keep it secret) and {}",
                seed.display(),
                out.join(keys::PUBLIC_FILE).display()
            );
            println!("public key: {}", public.hex());
            Ok(())
        }
        Command::Sign { digest, key } => {
            let key = key
                .load()?
                .context("no signing key: set AETHER_SIGNING_KEY or --key-file")?;
            let digest: aether_common::Digest = digest.parse().context("digest")?;
            println!("{}", key.sign(&digest).hex());
            Ok(())
        }
    }
}
