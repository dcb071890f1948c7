//! Ed25519 keys on disk and in the environment: generating, loading, signing.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aether_common::{PublicKey, SigningKey};
use anyhow::{Context, bail};

pub const SEED_FILE: &str = "aether.key";
pub const PUBLIC_FILE: &str = "aether.pub";

/// Writes a fresh key pair into `dir`: `aether.key` (the seed, hex, mode 0600) and
/// `aether.pub` (the public key, hex). Refuses to overwrite an existing key.
pub fn keygen(dir: &Path) -> anyhow::Result<(PathBuf, PublicKey)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading /dev/urandom")?;
    let key = SigningKey::from_seed(seed);
    let seed_path = dir.join(SEED_FILE);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&seed_path)
        .with_context(|| format!("creating {} (it must not exist yet)", seed_path.display()))?;
    std::io::Write::write_all(&mut file, format!("{}\n", key.seed_hex()).as_bytes())?;
    let public = key.public_key();
    std::fs::write(dir.join(PUBLIC_FILE), format!("{}\n", public.hex()))?;
    Ok((seed_path, public))
}

/// The signing key from `--key-file` or `AETHER_SIGNING_KEY`, if any.
pub fn signing_key(
    key_file: Option<&Path>,
    env_key: Option<&str>,
) -> anyhow::Result<Option<SigningKey>> {
    match (key_file, env_key.filter(|k| !k.trim().is_empty())) {
        (Some(_), Some(_)) => bail!("give --key-file or AETHER_SIGNING_KEY, not both"),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            Ok(Some(
                text.trim().parse().context("invalid signing key file")?,
            ))
        }
        (None, Some(hex)) => Ok(Some(
            hex.trim().parse().context("invalid AETHER_SIGNING_KEY")?,
        )),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_private_seed_and_a_matching_public_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (seed, public) = keygen(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = signing_key(Some(&seed), None).unwrap().unwrap();
        assert_eq!(key.public_key(), public);
        assert!(keygen(dir.path()).is_err(), "never overwrites a key");
    }
}
