//! Per-thread pools of the large temporary copies some kernels make on every call (the
//! attention's transposed key panels and head-major value rows, megabytes at common sizes).
//! A fresh allocation of that size is mapped anew by the allocator and costs a page fault
//! per 4 KiB on first touch: ~15% of an AVX-512 attention forward at B1 H8 S2048 D64. A
//! buffer taken here comes back to its thread's pool when dropped, already mapped.

use std::any::Any;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Most bytes of buffers one thread keeps between calls; a buffer that would pass it is
/// freed instead.
const KEEP_BYTES: usize = 64 << 20;

struct Pool {
    buffers: Vec<Box<dyn Any>>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { buffers: Vec::new(), bytes: 0 }) };
}

/// A buffer of `len` values of A from the current thread's pool (or newly allocated).
pub(crate) struct Scratch<A: Copy + 'static> {
    buf: Vec<A>,
}

impl<A: Copy + 'static> Scratch<A> {
    /// `len` values: what an earlier use left, then `fill` where the buffer grew. Callers
    /// must write every value they later read.
    pub(crate) fn take(len: usize, fill: A) -> Self {
        let reused = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            // the smallest buffer that holds len values, else the largest (grown once): calls
            // that take buffers of several sizes then keep getting the same ones back
            let ours = || {
                (pool.buffers.iter().enumerate())
                    .filter_map(|(i, b)| b.downcast_ref::<Vec<A>>().map(|v| (i, v.capacity())))
            };
            let fits = ours().filter(|&(_, c)| c >= len).min_by_key(|&(_, c)| c);
            let (at, _) = fits.or_else(|| ours().max_by_key(|&(_, c)| c))?;
            let buf = pool.buffers.swap_remove(at).downcast::<Vec<A>>().ok()?;
            pool.bytes -= buf.capacity() * size_of::<A>();
            Some(*buf)
        });
        let mut buf = reused.unwrap_or_default();
        buf.truncate(len);
        buf.resize(len, fill);
        Self { buf }
    }

    /// `len` values, every one `value` (for buffers that are accumulated into).
    pub(crate) fn filled(len: usize, value: A) -> Self {
        let mut out = Self::take(len, value);
        out.fill(value);
        out
    }
}

impl<A: Copy + 'static> Drop for Scratch<A> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let bytes = buf.capacity() * size_of::<A>();
        if bytes == 0 {
            return;
        }
        // try_with: a buffer dropped while the thread's locals are torn down is just freed
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.bytes + bytes <= KEEP_BYTES {
                pool.bytes += bytes;
                pool.buffers.push(Box::new(buf));
            }
        });
    }
}

impl<A: Copy + 'static> Deref for Scratch<A> {
    type Target = [A];
    fn deref(&self) -> &[A] {
        &self.buf
    }
}

impl<A: Copy + 'static> DerefMut for Scratch<A> {
    fn deref_mut(&mut self) -> &mut [A] {
        &mut self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_resized_and_capped() {
        let first = Scratch::<f32>::take(1000, 1.0);
        assert_eq!(first.len(), 1000);
        assert!(first.iter().all(|x| *x == 1.0));
        let at = first.as_ptr();
        drop(first);
        // the same allocation comes back, shorter, keeping the old values
        let again = Scratch::<f32>::take(10, 2.0);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(&again[..], &[1.0; 10]);
        // another type gets its own buffer
        let other = Scratch::<f64>::take(3, 5.0);
        assert_eq!(&other[..], &[5.0; 3]);
        drop(again);
        // grown: the new part holds the fill value
        let grown = Scratch::<f32>::take(2000, 3.0);
        assert_eq!(&grown[..10], &[1.0; 10]);
        assert!(grown[10..].iter().all(|x| *x == 3.0));
        drop(grown);
        // past the cap: freed, not kept
        let huge = Scratch::<u8>::take(KEEP_BYTES + 1, 0);
        drop(huge);
        POOL.with(|p| assert!(p.borrow().bytes <= KEEP_BYTES));
    }

    #[test]
    fn the_smallest_buffer_that_fits_is_taken() {
        let (small, big) = (
            Scratch::<f32>::take(1000, 0.0),
            Scratch::<f32>::take(5000, 0.0),
        );
        let (small_at, big_at) = (small.as_ptr(), big.as_ptr());
        drop((big, small)); // pool order: the 5000 buffer first
        let a = Scratch::<f32>::take(500, 0.0);
        assert_eq!(a.as_ptr(), small_at);
        drop(a);
        let b = Scratch::<f32>::take(4000, 0.0);
        assert_eq!(b.as_ptr(), big_at);
        // none fits: the largest is taken and grown
        let c = Scratch::<f32>::take(800, 0.0);
        assert_eq!(c.as_ptr(), small_at);
        drop(c);
        drop(b);
        let d = Scratch::<f32>::take(6000, 0.0);
        assert_eq!(d.len(), 6000);
        POOL.with(|p| assert_eq!(p.borrow().buffers.len(), 1));
    }
}
