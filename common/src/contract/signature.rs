//! Ed25519 keys and signatures. A signature covers the ASCII bytes of the 64-hex digest
//! (without the `sha256:` prefix), so it can be made by any Ed25519 tool from the hex alone.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::Signer;

use crate::Digest;

/// Why a key or signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("public key must be 64 hex digits (a 32-byte Ed25519 key)")]
    BadPublicKey,
    #[error("signing key must be 64 hex digits (a 32-byte Ed25519 seed)")]
    BadSigningKey,
    #[error("signature must be 128 hex digits")]
    BadSignature,
    #[error("signature does not verify against the configured public key")]
    Mismatch,
}

/// An Ed25519 public key, written as 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// An Ed25519 signature, written as 128 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(ed25519_dalek::Signature);

/// An Ed25519 signing key, built from a 32-byte seed written as 64 hex digits. Its `Debug`
/// form never shows the seed.
pub struct SigningKey(ed25519_dalek::SigningKey);

/// The environment names of the public key, inline and as a file (a Secret mount).
pub const PUBKEY_ENV: &str = "AETHER_PUBKEY";
pub const PUBKEY_FILE_ENV: &str = "AETHER_PUBKEY_FILE";

/// Why the configured public key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("set {PUBKEY_ENV} or {PUBKEY_FILE_ENV}, not both")]
    Both,
    #[error("reading {PUBKEY_FILE_ENV} {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid public key in {from}: {source}")]
    Invalid {
        from: String,
        #[source]
        source: SignatureError,
    },
}

/// The public key given inline (`AETHER_PUBKEY`) or in a file (`AETHER_PUBKEY_FILE`), if
/// either is set (blank counts as unset); both at once is an error.
pub fn load_public_key(
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<PublicKey>, KeyError> {
    let inline = inline.filter(|k| !k.trim().is_empty());
    let (text, from) = match (inline, file) {
        (Some(_), Some(_)) => return Err(KeyError::Both),
        (Some(k), None) => (k.to_owned(), PUBKEY_ENV.to_owned()),
        (None, Some(path)) => (
            std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })?,
            path.display().to_string(),
        ),
        (None, None) => return Ok(None),
    };
    text.trim()
        .parse()
        .map(Some)
        .map_err(|source| KeyError::Invalid { from, source })
}

fn decode_fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

impl PublicKey {
    /// Checks `signature` over `digest`. Uses strict verification, which refuses the
    /// malleable and small-order forms that plain verification lets through.
    pub fn verify(&self, digest: &Digest, signature: &Signature) -> Result<(), SignatureError> {
        self.0
            .verify_strict(digest.hex().as_bytes(), &signature.0)
            .map_err(|_| SignatureError::Mismatch)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_fixed::<32>(s).ok_or(SignatureError::BadPublicKey)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| SignatureError::BadPublicKey)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.hex())
    }
}

impl Signature {
    pub fn hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }
}

impl FromStr for Signature {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = decode_fixed::<64>(s).ok_or(SignatureError::BadSignature)?;
        Ok(Self(ed25519_dalek::Signature::from_bytes(&bytes)))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", self.hex())
    }
}

impl SigningKey {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn sign(&self, digest: &Digest) -> Signature {
        Signature(self.0.sign(digest.hex().as_bytes()))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The seed as 64 hex digits, for writing a key file. Handle with care.
    pub fn seed_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }
}

impl FromStr for SigningKey {
    type Err = SignatureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_fixed::<32>(s)
            .map(Self::from_seed)
            .ok_or(SignatureError::BadSigningKey)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_seed([7u8; 32])
    }

    #[test]
    fn signature_round_trips_and_verifies() {
        let d = Digest::of(b"artifact");
        let sig = key().sign(&d);
        let parsed: Signature = sig.hex().parse().unwrap();
        let pk: PublicKey = key().public_key().hex().parse().unwrap();
        assert_eq!(pk.verify(&d, &parsed), Ok(()));
    }

    #[test]
    fn signature_over_other_digest_is_refused() {
        let sig = key().sign(&Digest::of(b"a"));
        assert_eq!(
            key().public_key().verify(&Digest::of(b"b"), &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn signature_by_other_key_is_refused() {
        let d = Digest::of(b"a");
        let sig = SigningKey::from_seed([8u8; 32]).sign(&d);
        assert_eq!(
            key().public_key().verify(&d, &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_hex_is_refused() {
        assert_eq!("zz".parse::<Signature>(), Err(SignatureError::BadSignature));
        assert_eq!(
            "ab".repeat(31).parse::<PublicKey>(),
            Err(SignatureError::BadPublicKey)
        );
        assert!("00".repeat(33).parse::<SigningKey>().is_err());
    }

    #[test]
    fn debug_never_shows_the_seed() {
        let k = key();
        assert!(!format!("{k:?}").contains(&k.seed_hex()));
    }
}
