//! Shared by the process tests: child processes that die with the test.

use std::process::Child;

/// Processes SIGKILLed (and reaped) when dropped, so a failing assertion does not leave
/// them running.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
