//! Byte buffers kept from finished work for the next: the encoder's compression scratch, the
//! decoder's block buffers and a restore's piece buffers. A backup or restore moves every byte
//! of the database through such buffers, and a fresh allocation for each object or piece cost a
//! page fault (and, for a zeroed one, a memset) per 4 KiB every time. Each pool keeps at most a
//! fixed number, so memory stays bounded by the buffers in use at once. Used by codec and packs.

use std::sync::Mutex;

pub(super) struct Spare {
    kept: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl Spare {
    pub(super) const fn new(max: usize) -> Spare {
        Spare {
            kept: Mutex::new(Vec::new()),
            max,
        }
    }

    /// A kept buffer (its old bytes still in it), or an empty one.
    pub(super) fn take(&self) -> Vec<u8> {
        self.kept
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_default()
    }

    /// Keeps `buf`'s allocation for a later [`Spare::take`], unless enough are kept.
    pub(super) fn keep(&self, buf: &mut Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() < self.max {
                kept.push(std::mem::take(buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_its_bound_and_hands_back_allocations() {
        let spare = Spare::new(2);
        let mut bufs: Vec<Vec<u8>> = (0..3).map(|_| Vec::with_capacity(64)).collect();
        let mut empty = Vec::new();
        spare.keep(&mut empty);
        for buf in &mut bufs {
            spare.keep(buf);
        }
        // Two kept, the third left with its owner, the empty one not kept at all.
        assert_eq!(bufs.iter().filter(|b| b.capacity() == 0).count(), 2);
        assert!(spare.take().capacity() >= 64);
        assert!(spare.take().capacity() >= 64);
        assert_eq!(spare.take().capacity(), 0);
    }
}
