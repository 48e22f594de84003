//! A small counting semaphore: bounds concurrent evaluations to the pooling allocator's slots,
//! and lets the epoch ticker sleep while no evaluation runs.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

pub(crate) struct Semaphore {
    size: usize,
    free: Mutex<usize>,
    cv: Condvar,
    busy: Condvar,
}

pub(crate) struct Permit<'a>(&'a Semaphore);

impl Semaphore {
    pub(crate) fn new(n: usize) -> Self {
        Semaphore {
            size: n,
            free: Mutex::new(n),
            cv: Condvar::new(),
            busy: Condvar::new(),
        }
    }

    pub(crate) fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(PoisonError::into_inner);
        }
        if *free == self.size {
            self.busy.notify_all();
        }
        *free -= 1;
        Permit(self)
    }

    /// Blocks until an evaluation runs, or `timeout` passes; true if one runs.
    pub(crate) fn wait_busy(&self, timeout: Duration) -> bool {
        let free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (free, _) = self
            .busy
            .wait_timeout_while(free, timeout, |f| *f == self.size)
            .unwrap_or_else(PoisonError::into_inner);
        *free < self.size
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(PoisonError::into_inner);
        *free += 1;
        self.0.cv.notify_one();
    }
}
