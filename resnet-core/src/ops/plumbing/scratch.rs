//! Reused scratch buffers for the kernels' temporaries.
//!
//! Every Winograd task fills two temporaries (its transformed tiles and their products, about
//! 4 MB together) and frees them, hundreds of times a step; the in-bounds taps do the same with
//! their patches. A fresh `vec![0; n]` clears every byte first, though the kernels overwrite
//! them all, and that clearing is a pass over memory the step does not need. The same sizes recur every step, so the buffers are kept here and handed out again as they are.
//! Contents are whatever the last user left (always initialised values, never read before the
//! kernel writes them), so a buffer from [`take`] is for outputs the caller overwrites in full.

use std::any::Any;
use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::WithDType;
use rayon::prelude::*;

/// Bytes kept at most (beyond that, the smallest buffers are dropped): enough for the largest
/// temporaries of a 96 px step, a bounded addition to its peak memory.
const MAX_BYTES: usize = 192 << 20;

static POOL: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

/// A buffer of `len` elements with unspecified (initialised) contents, for a caller that
/// overwrites every element: the shortest kept buffer that is long enough, else the kept one
/// with the least room that has room for `len` (lengthened by zeros: a buffer handed out shorter
/// keeps its allocation), else a new one, cleared by the worker threads from
/// [`PARALLEL_CLEAR`] elements (a miss on the calling thread would clear it there while the
/// workers wait).
pub fn take<T: WithDType>(len: usize) -> Vec<T> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let kept = |b: &Box<dyn Any + Send>| b.downcast_ref::<Vec<T>>().map(|v| (v.len(), v.capacity()));
    let fits = pool
        .iter()
        .enumerate()
        .filter_map(|(i, b)| kept(b).filter(|&(n, _)| n >= len).map(|(n, _)| (i, n)))
        .min_by_key(|&(_, n)| n)
        .map(|(i, _)| i);
    let room = || {
        pool.iter()
            .enumerate()
            .filter_map(|(i, b)| kept(b).filter(|&(_, cap)| cap >= len).map(|(_, cap)| (i, cap)))
            .min_by_key(|&(_, cap)| cap)
            .map(|(i, _)| i)
    };
    match fits.or_else(room) {
        Some(i) => {
            let mut v = *pool.swap_remove(i).downcast::<Vec<T>>().expect("checked above");
            drop(pool);
            v.resize(len, T::zero());
            v
        }
        None => {
            drop(pool);
            if len >= PARALLEL_CLEAR {
                zeroed(len)
            } else {
                vec![T::zero(); len]
            }
        }
    }
}

/// Elements from which a new buffer is cleared by [`zeroed`].
const PARALLEL_CLEAR: usize = 1 << 20;

/// A buffer of `len` zeros written by the worker threads, for outputs that leave the kernel
/// (so cannot come from the pool). `vec![0; len]` would clear it on the calling thread alone,
/// while the workers wait, and on large outputs that serial pass is a real share of a step.
pub fn zeroed<T: WithDType>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.par_extend(rayon::iter::repeat_n(T::zero(), len));
    v
}

/// A new buffer of `len` elements that `fill` writes in full, for outputs that leave the kernel:
/// never cleared (as [`zeroed`] clears), so the output is written once, by the kernel. If `fill`
/// panics, nothing is read and the buffer is freed.
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub unsafe fn written<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len`, and the caller vouches that `fill` wrote every
    // element below it.
    unsafe { v.set_len(len) };
    v
}

/// `part` as the values it holds, once they are all written.
///
/// # Safety
/// Every element of `part` must have been written.
pub unsafe fn assume_init<T>(part: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the caller vouches that every element is
    // initialised.
    unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// An element a kernel writes its result into: initialised memory, or memory not yet written
/// (an output from [`written`]). Either way the kernel only stores into it.
pub trait Slot<T>: Send {
    fn put(&mut self, value: T);
}

impl<T: Send> Slot<T> for T {
    #[inline(always)]
    fn put(&mut self, value: T) {
        *self = value;
    }
}

impl<T: Send> Slot<T> for MaybeUninit<T> {
    #[inline(always)]
    fn put(&mut self, value: T) {
        self.write(value);
    }
}

/// Returns a buffer from [`take`] for reuse.
pub fn give<T: WithDType>(v: Vec<T>) {
    if v.is_empty() {
        return;
    }
    // Steps repeat their sizes, so a buffer comes back at the length it will be asked for next.
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(Box::new(v));
    while pool.iter().map(|b| size_of_buffer(b.as_ref())).sum::<usize>() > MAX_BYTES {
        let smallest =
            pool.iter().enumerate().min_by_key(|(_, b)| size_of_buffer(b.as_ref())).map(|(i, _)| i).expect("non-empty");
        pool.swap_remove(smallest);
    }
}

fn size_of_buffer(b: &(dyn Any + Send)) -> usize {
    if let Some(v) = b.downcast_ref::<Vec<f32>>() {
        v.capacity() * 4
    } else if let Some(v) = b.downcast_ref::<Vec<f64>>() {
        v.capacity() * 8
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_the_asked_length_and_type() {
        let a: Vec<f64> = take(1000);
        assert_eq!(a.len(), 1000);
        give(a);
        let b: Vec<f64> = take(10);
        assert_eq!(b.len(), 10);
        let c: Vec<f32> = take(10);
        assert_eq!(c.len(), 10);
        give(b);
        give(c);
        let z: Vec<f32> = zeroed(100_000);
        assert_eq!(z.len(), 100_000);
        assert!(z.iter().all(|&v| v == 0.0));
    }

    /// A buffer handed out shorter than its allocation serves a longer request later (no test
    /// but this one takes `u32` buffers, so no other test takes it in between).
    #[test]
    fn a_shortened_buffer_is_lengthened_in_its_allocation() {
        let a: Vec<u32> = take(1000);
        give(a);
        let b: Vec<u32> = take(10);
        assert_eq!(b.len(), 10);
        give(b);
        let c: Vec<u32> = take(600);
        assert_eq!(c.len(), 600);
        assert!(c.capacity() >= 1000, "a new allocation of {} instead of the kept one", c.capacity());
        give(c);
    }
}
