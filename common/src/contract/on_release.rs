//! `AETHER_ON_RELEASE`: what the supervisor does to a running app when a new release goes
//! live. Shared by the supervisor that acts on it and the CLI that validates
//! `aether deploy --on-release` before a Deployment carries it.

use std::fmt;
use std::str::FromStr;

/// Signals an app may ask for, by name (`HUP` or `SIGHUP`), with their Linux numbers
/// (x86-64 and arm64 alike; the supervisor's tests check them against libc).
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
    ("WINCH", 28),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRelease {
    /// Stop the app (SIGTERM, SIGKILL after the grace period) and start it in the new
    /// release.
    #[default]
    Restart,
    /// Send this signal (a Linux signal number) to the app's process and keep it.
    Signal(i32),
    /// Leave the app alone: it notices new code itself (a file watcher).
    None,
}

impl OnRelease {
    /// The signal's name without `SIG`, for logs.
    pub fn signal_name(sig: i32) -> String {
        SIGNALS
            .iter()
            .find(|(_, n)| *n == sig)
            .map_or_else(|| sig.to_string(), |(name, _)| (*name).to_owned())
    }
}

impl FromStr for OnRelease {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "restart" => return Ok(Self::Restart),
            "none" => return Ok(Self::None),
            _ => {}
        }
        let Some(sig) = s.strip_prefix("signal:") else {
            return Err(format!(
                "{s:?} is not an on-release action: use restart, signal:<SIG> (for example signal:HUP) or none"
            ));
        };
        let name = sig.strip_prefix("SIG").unwrap_or(sig);
        SIGNALS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, n)| Self::Signal(*n))
            .ok_or_else(|| {
                let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
                format!(
                    "signal {sig:?} is not one an app reloads on: use one of {}",
                    known.join(", ")
                )
            })
    }
}

impl fmt::Display for OnRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Restart => f.write_str("restart"),
            Self::Signal(sig) => write!(f, "signal:{}", Self::signal_name(*sig)),
            Self::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form_and_prints_it_back() {
        for (text, want, shown) in [
            ("restart", OnRelease::Restart, "restart"),
            ("none", OnRelease::None, "none"),
            ("signal:HUP", OnRelease::Signal(1), "signal:HUP"),
            ("signal:SIGUSR2", OnRelease::Signal(12), "signal:USR2"),
            ("signal:hup", OnRelease::Signal(1), "signal:HUP"),
        ] {
            let got: OnRelease = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), shown);
        }
    }

    #[test]
    fn refuses_unknown_actions_and_signals_that_cannot_be_a_reload() {
        for bad in [
            "",
            "reload",
            "signal:",
            "signal:KILL",
            "signal:9",
            "signal:STOP",
        ] {
            let err = bad.parse::<OnRelease>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }
}
