//! Clean-up that no refresh waits for (freeing a manifest no longer kept in memory,
//! unlinking a taken base's 6 MB manifest), each on a thread of its own that first waits
//! for the refresh under way to end, then runs at the lowest CPU priority: on a pod's one
//! or two cores it runs in the gaps, not beside the refresh that caused it (which measured
//! up to a millisecond later at 40,000 files) or another fetcher's.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The nice value of clean-up threads: the lowest priority that still runs when the CPU
/// is busy (`SCHED_IDLE` could starve it for as long as the app keeps the cores busy, and
/// a freed manifest is memory the pod gets back only then).
const NICE: libc::c_int = 19;

/// Longest a clean-up waits for refreshes to end: a refresh stuck on a slow download must
/// not hold on to the memory it would free.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Whether refreshes are under way; clean-up waits for none to be.
#[derive(Debug, Default)]
pub struct Quiet {
    busy: Mutex<usize>,
    idle: Condvar,
}

/// A refresh under way, until dropped.
#[derive(Debug)]
pub struct Busy(Arc<Quiet>);

impl Quiet {
    /// Marks a refresh under way until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        if let Ok(mut busy) = self.busy.lock() {
            *busy += 1;
        }
        Busy(self.clone())
    }

    /// Returns once no refresh is under way (true), or after `max` (false).
    fn wait(&self, max: Duration) -> bool {
        match self.busy.lock() {
            Ok(busy) => self
                .idle
                .wait_timeout_while(busy, max, |busy| *busy > 0)
                .is_ok_and(|(_, waited)| !waited.timed_out()),
            Err(_) => true,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock() {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.0.idle.notify_all();
            }
        }
    }
}

/// Runs `work` on a new thread named `name` once no refresh is under way (at most
/// `MAX_WAIT` later), at nice 19. An error means no thread was started and `work` was
/// dropped unrun: a caller whose work must happen does it then.
pub fn spawn(
    quiet: &Arc<Quiet>,
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    let quiet = quiet.clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            quiet.wait(MAX_WAIT);
            lower_priority();
            work();
        })
        .map(drop)
}

/// Lowers the calling thread's priority. On Linux the nice value is per thread and
/// `who == 0` is the calling thread (setpriority(2), NOTES). Best effort: at worst the
/// clean-up runs at the usual priority.
fn lower_priority() {
    // SAFETY: no pointers; only the calling thread's nice value changes.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// The calling thread's nice value.
    fn nice() -> libc::c_int {
        // SAFETY: no pointers; reads the calling thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn clean_up_runs_on_its_own_thread_at_the_lowest_priority() {
        // The test may itself run niced.
        let caller = nice();
        let (tx, rx) = mpsc::channel();
        spawn(&Arc::default(), "test-clean-up", move || {
            let name = std::thread::current().name().map(str::to_owned);
            let _ = tx.send((nice(), name));
        })
        .unwrap();
        let (nice_there, name) = rx.recv().unwrap();
        assert_eq!(nice_there, NICE);
        assert_eq!(name.as_deref(), Some("test-clean-up"));
        assert_eq!(nice(), caller, "the caller's priority is untouched");
    }

    #[test]
    fn clean_up_waits_for_the_refreshes_under_way_to_end() {
        let quiet = Arc::new(Quiet::default());
        assert!(quiet.wait(Duration::ZERO), "no refresh: quiet at once");
        let first = quiet.busy();
        let second = quiet.busy();
        assert!(!quiet.wait(Duration::ZERO), "two refreshes under way");
        drop(second);
        assert!(!quiet.wait(Duration::ZERO), "one refresh still under way");
        // A waiting clean-up is woken by the last refresh's end (with no time limit: the
        // test would hang, not pass, were it not).
        let (tx, rx) = mpsc::channel();
        let gate = quiet.clone();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(());
            gate.wait(Duration::MAX)
        });
        rx.recv().unwrap();
        drop(first);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn clean_up_runs_at_once_when_no_refresh_is_under_way() {
        let (tx, rx) = mpsc::channel();
        spawn(&Arc::default(), "test-clean-up", move || {
            let _ = tx.send(());
        })
        .unwrap();
        rx.recv().unwrap();
    }
}
