//! Trust checks: the signature policy, applied before the first byte is requested, and the
//! digest comparison, applied after the last byte and before anything becomes visible.

use aether_common::contract::annotations::{DesiredRelease, SIGNATURE};
use aether_common::{Digest, PublicKey};

use crate::failure::{Reason, RefreshError};

/// With a key configured, the desired digest must carry a valid signature; without one,
/// any signature annotation is ignored.
pub fn signature(key: Option<&PublicKey>, desired: &DesiredRelease) -> Result<(), RefreshError> {
    let Some(key) = key else {
        return Ok(());
    };
    let Some(sig) = &desired.signature else {
        return Err(RefreshError::new(
            Reason::Signature,
            format!("{SIGNATURE} is missing and a public key is configured"),
        ));
    };
    key.verify(&desired.digest, sig)
        .map_err(|e| RefreshError::new(Reason::Signature, e))
}

/// The bytes received must hash to the annotated digest.
pub fn digest(expected: &Digest, got: &Digest) -> Result<(), RefreshError> {
    if expected == got {
        Ok(())
    } else {
        Err(RefreshError::new(
            Reason::Checksum,
            format!("artifact hashes to {got}, annotation says {expected}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_common::SigningKey;

    fn desired(signature: Option<aether_common::Signature>) -> DesiredRelease {
        DesiredRelease {
            digest: Digest::of(b"a"),
            url: "https://h/a".into(),
            signature,
            format: Default::default(),
        }
    }

    #[test]
    fn no_key_accepts_unsigned() {
        assert!(signature(None, &desired(None)).is_ok());
    }

    #[test]
    fn key_refuses_missing_and_wrong_signature() {
        let k = SigningKey::from_seed([1; 32]);
        let pk = k.public_key();
        assert!(signature(Some(&pk), &desired(None)).is_err());
        let other = SigningKey::from_seed([2; 32]).sign(&Digest::of(b"a"));
        assert!(signature(Some(&pk), &desired(Some(other))).is_err());
        let good = k.sign(&Digest::of(b"a"));
        assert!(signature(Some(&pk), &desired(Some(good))).is_ok());
    }
}
