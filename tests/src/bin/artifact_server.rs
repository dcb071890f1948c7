//! `aether-artifact-server`: serves every file of a directory over HTTP on loopback (the
//! files are read into memory at start), for scripts and benchmarks. Prints its base URL.

use std::net::SocketAddr;
use std::path::PathBuf;

use aether_testkit::artifacts::ArtifactServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs ADDR"))?
                    .parse()?
            }
            "--dir" => {
                dir = Some(
                    args.next()
                        .ok_or_else(|| anyhow::anyhow!("--dir needs DIR"))?
                        .into(),
                )
            }
            "--help" | "-h" => {
                println!("usage: aether-artifact-server --dir DIR [--listen 127.0.0.1:PORT]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let dir = dir.ok_or_else(|| anyhow::anyhow!("--dir is required"))?;
    let server = ArtifactServer::start_on(listen).await?;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            server.put(&name, std::fs::read(entry.path())?);
        }
    }
    println!("http://{}", server.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
