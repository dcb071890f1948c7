//! The bridge between the async download and the blocking extractor: bytes received on the
//! runtime are handed through a bounded channel to a blocking thread that inflates and
//! unpacks them, so hashing, inflating and writing overlap while memory stays bounded.

use std::io::{self, Read};

use aether_common::archive::extract::{self, ExtractError, Limits, Stats};
use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::failure::{Reason, RefreshError};
use crate::workspace::Staging;

/// Chunks in flight between the download and the extractor. hyper grows its read buffer
/// up to ~400 KiB on fast links, so this bounds the buffered bytes to a few MiB: enough
/// for hashing, inflating and writing to overlap, and flat whatever the artifact size.
const CHANNEL_DEPTH: usize = 8;

/// The sending half; dropping it ends the stream for the extractor.
pub type Feed = mpsc::Sender<Bytes>;

/// The extractor's task: it hands the staging directory back with the outcome, so the
/// caller decides whether to commit or discard it.
pub type Extractor = JoinHandle<(Staging, Result<Stats, ExtractError>)>;

/// Starts extracting into `staging` on a blocking thread; returns the feed and a handle
/// that yields the staging directory back with the outcome. The thread checks `cancel`
/// before every entry and chunk, so a deadline or shutdown stops it promptly.
pub fn spawn(staging: Staging, limits: Limits, cancel: CancellationToken) -> (Feed, Extractor) {
    let (tx, reader) = channel(CHANNEL_DEPTH);
    let handle = tokio::task::spawn_blocking(move || {
        let cancelled = || cancel.is_cancelled();
        let result =
            extract::unpack_tar_gz_cancellable(reader, staging.path(), &limits, &cancelled);
        (staging, result)
    });
    (tx, handle)
}

/// Maps an extraction error to its failure reason.
pub fn classify(e: ExtractError) -> RefreshError {
    let reason = match &e {
        ExtractError::Refused { .. } | ExtractError::Corrupt(_) => Reason::Extract,
        ExtractError::TooLarge(_) => Reason::TooLarge,
        ExtractError::Io { .. } => Reason::Io,
        ExtractError::Cancelled => return RefreshError::Cancelled,
    };
    RefreshError::new(reason, e)
}

/// A feed and the blocking reader of what it sends (EOF once the feed is dropped), for
/// other blocking consumers of a download (the batched blob download's tar).
pub fn channel(depth: usize) -> (Feed, ChannelReader) {
    let (tx, rx) = mpsc::channel(depth);
    (
        tx,
        ChannelReader {
            rx,
            current: Bytes::new(),
        },
    )
}

pub struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
