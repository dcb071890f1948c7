//! `aether-kube-emulator`: the Kubernetes API emulator as a process, for scripts and
//! benchmarks. Prints its URL on stdout once it listens, then serves until killed.

use std::net::SocketAddr;
use std::time::Duration;

use aether_testkit::emulator::{Emulator, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?;
                options.listen = value.parse::<SocketAddr>()?;
            }
            "--bookmark-sec" => {
                let value = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--bookmark-sec needs N"))?;
                options.bookmark_every = Duration::from_secs(value.parse()?);
            }
            "--help" | "-h" => {
                println!(
                    "usage: aether-kube-emulator [--listen 127.0.0.1:PORT] [--bookmark-sec N]"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let emulator = Emulator::start_with(options).await?;
    println!("{}", emulator.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
