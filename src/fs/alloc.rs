//! Free-space map of the data area: sorted free runs, first fit from a
//! moving cursor so consecutive allocations stay contiguous.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct Allocator {
    /// start block -> run length, never overlapping or touching.
    free: BTreeMap<u64, u64>,
    free_blocks: u64,
    cursor: u64,
}

impl Allocator {
    /// All of `start..end` free.
    pub fn new(start: u64, end: u64) -> Self {
        let mut a = Self::default();
        if end > start {
            a.release(start, end - start);
        }
        a.cursor = start;
        a
    }

    pub fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// Marks a run as in use (at mount, for blocks the metadata references).
    /// Returns false if any part of it was not free (a double reference).
    pub fn reserve(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        let mut ok = true;
        let mut pos = start;
        while pos < end {
            let Some((&fs, &fl)) = self.free.range(..=pos).next_back() else {
                // No free run starts at or before pos: find the next one.
                match self.free.range(pos..end).next() {
                    Some((&ns, _)) => {
                        ok = false;
                        pos = ns;
                        continue;
                    }
                    None => return false,
                }
            };
            if fs + fl <= pos {
                match self.free.range(pos..end).next() {
                    Some((&ns, _)) => {
                        ok = false;
                        pos = ns;
                        continue;
                    }
                    None => return false,
                }
            }
            // pos lies in the free run fs..fs+fl.
            let take_end = end.min(fs + fl);
            self.free.remove(&fs);
            if fs < pos {
                self.free.insert(fs, pos - fs);
            }
            if take_end < fs + fl {
                self.free.insert(take_end, fs + fl - take_end);
            }
            self.free_blocks -= take_end - pos;
            pos = take_end;
        }
        ok
    }

    /// Allocates up to `want` blocks as few runs as possible, preferring
    /// `hint` (the block after the file's last extent). Returns the runs;
    /// their total is less than `want` only when the device is full.
    pub fn allocate(&mut self, want: u64, hint: Option<u64>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut left = want;
        if let Some(h) = hint {
            // Extend in place when the block right after the file is free.
            if let Some((&fs, &fl)) = self.free.range(..=h).next_back() {
                if fs + fl > h {
                    let n = left.min(fs + fl - h);
                    self.reserve(h, n);
                    out.push((h, n));
                    left -= n;
                }
            }
        }
        // Prefer one run that fits the rest whole, after the cursor.
        while left > 0 && self.free_blocks > 0 {
            let pick = self
                .free
                .range(self.cursor..)
                .find(|(_, &l)| l >= left)
                .or_else(|| self.free.iter().find(|(_, &l)| l >= left))
                .or_else(|| self.free.iter().max_by_key(|(_, &l)| l))
                .map(|(&s, &l)| (s, l));
            let Some((s, l)) = pick else { break };
            let n = left.min(l);
            self.reserve(s, n);
            self.cursor = s + n;
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += n,
                _ => out.push((s, n)),
            }
            left -= n;
        }
        out
    }

    /// Returns a run to the free map, merging with its neighbours.
    pub fn release(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut l = len;
        if let Some((&ps, &pl)) = self.free.range(..s).next_back() {
            debug_assert!(ps + pl <= s, "double free of block {s}");
            if ps + pl == s {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            l += nl;
        }
        self.free.insert(s, l);
        self.free_blocks += len;
    }

    #[cfg(test)]
    pub fn is_free(&self, block: u64) -> bool {
        self.free
            .range(..=block)
            .next_back()
            .is_some_and(|(&s, &l)| block < s + l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_merge() {
        let mut a = Allocator::new(10, 110);
        assert_eq!(a.free_blocks(), 100);
        let r = a.allocate(30, None);
        assert_eq!(r, vec![(10, 30)]);
        let r2 = a.allocate(10, Some(40));
        assert_eq!(r2, vec![(40, 10)]);
        assert_eq!(a.free_blocks(), 60);
        a.release(10, 30);
        a.release(40, 10);
        assert_eq!(a.free_blocks(), 100);
        assert_eq!(a.free.len(), 1);
        // Fragmented: asking for more than any run gives several runs.
        assert!(a.reserve(20, 10));
        assert!(a.reserve(60, 10));
        let r = a.allocate(75, None);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 75);
        assert_eq!(a.allocate(10, None).iter().map(|x| x.1).sum::<u64>(), 5);
        assert_eq!(a.free_blocks(), 0);
    }

    #[test]
    fn reserve_detects_double_use() {
        let mut a = Allocator::new(0, 100);
        assert!(a.reserve(10, 10));
        assert!(!a.reserve(15, 10));
        assert!(!a.is_free(24));
        assert!(a.is_free(25));
    }
}
