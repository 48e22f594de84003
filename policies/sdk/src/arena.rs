//! The allocator of policy instances.
//!
//! tetherd creates a fresh instance for every evaluation and throws it away after one call,
//! so nothing needs to be freed: a bump allocator over an arena in the module's own memory is
//! all a policy needs. It never calls `memory.grow` until the arena is exhausted (growing the
//! memory costs the host a system call per instance), frees the most recent allocation in
//! place, and grows the most recent allocation in place.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// Bytes of the static arena: enough for a workload's strings many times over.
const ARENA: usize = 64 * 1024;
const PAGE: usize = 64 * 1024;

#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA]>);

/// The allocator.
pub struct BumpAlloc {
    /// Next free byte and end of the current region, as addresses.
    state: UnsafeCell<(usize, usize)>,
    arena: Arena,
}

// Wasm policies are single-threaded.
unsafe impl Sync for BumpAlloc {}

impl BumpAlloc {
    /// An allocator whose arena is not in use yet.
    pub const fn new() -> Self {
        BumpAlloc {
            state: UnsafeCell::new((0, 0)),
            arena: Arena(UnsafeCell::new([0; ARENA])),
        }
    }

    /// Memory beyond the arena: fresh pages at the end of linear memory.
    fn grow(bytes: usize) -> Option<(usize, usize)> {
        let pages = bytes.div_ceil(PAGE);
        let old = core::arch::wasm32::memory_grow(0, pages);
        if old == usize::MAX {
            return None;
        }
        Some((old * PAGE, (old + pages) * PAGE))
    }
}

impl Default for BumpAlloc {
    fn default() -> Self {
        Self::new()
    }
}

unsafe impl GlobalAlloc for BumpAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded; the state is only touched here and in dealloc/realloc.
        let state = unsafe { &mut *self.state.get() };
        if state.1 == 0 {
            let start = self.arena.0.get() as usize;
            *state = (start, start + ARENA);
        }
        let align = layout.align();
        let start = (state.0 + align - 1) & !(align - 1);
        let end = start.saturating_add(layout.size());
        if end <= state.1 {
            state.0 = end;
            return start as *mut u8;
        }
        let Some((lo, hi)) = Self::grow(layout.size() + align) else {
            return core::ptr::null_mut();
        };
        let start = (lo + align - 1) & !(align - 1);
        *state = (start + layout.size(), hi);
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in alloc.
        let state = unsafe { &mut *self.state.get() };
        if ptr as usize + layout.size() == state.0 {
            state.0 = ptr as usize;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in alloc.
        let state = unsafe { &mut *self.state.get() };
        let start = ptr as usize;
        if start + layout.size() == state.0 && start + new_size <= state.1 {
            state.0 = start + new_size;
            return ptr;
        }
        // SAFETY: the layout's alignment is valid and the new size is non-zero by contract.
        let new =
            unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both regions are valid for the smaller size and do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}
