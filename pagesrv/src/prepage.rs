//! Adaptive pre-paging: what to push after a requested page, learnt from the requests.
//!
//! pagesrv sees requests, not the guest's threads, so it keeps a small table of *streams*
//! (like a CPU's stream prefetcher); interleaved threads that each walk memory keep their
//! own streams. A request is matched, in this order, to a stream it
//!
//! 1. **continues**: a step in the stream's direction, a whole number of strides, and no
//!    further than the window just pushed (the guest used the pushed pages and faulted
//!    right after them) plus a little slack: the window doubles, up to the maximum;
//! 2. **teaches**: a stream whose step is still unknown, within [`MAX_STRIDE`] pages: the
//!    step becomes its stride (`+1` sequential forward, `-1` backward, `±k` strided: the
//!    pages at the next multiples of the stride are pushed, not the gaps between them);
//! 3. **breaks**: a request near a stream that fits none of the above: the stride is
//!    relearnt from this step and the window drops to the minimum.
//!
//! Otherwise (random access) it starts a stream in the least recently used slot, with the
//! minimum window pushed forward (guests touch a page's neighbours more often than not). A
//! hot set (faults scattered over a small region) keeps breaking strides, so its windows
//! stay small and the push does not flood the link with guesses.

/// Streams tracked at once (threads walking memory independently).
const STREAMS: usize = 8;
/// Strides of slack beyond the pushed window that still continue a stream (the guest may
/// skip a few pages).
const SLACK_STRIDES: u64 = 16;
/// A request this near a stream that it does not continue breaks it (rather than starting
/// another stream).
const NEAR_PAGES: u64 = 16;
/// Largest stride learnt (pages): a wider step is random access.
const MAX_STRIDE: u64 = 512;

/// What to push after a request: `count` pages from `first`, `stride` apart (negative:
/// downwards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The first page to push.
    pub first: u64,
    /// Distance between pushed pages.
    pub stride: i64,
    /// How many pages.
    pub count: u64,
}

impl Plan {
    /// The pages of the plan within `0..total_pages`, in order.
    #[cfg(test)]
    pub fn pages(&self, total_pages: u64) -> impl Iterator<Item = u64> + '_ {
        (0..self.count)
            .map(move |k| i128::from(self.first) + i128::from(k) * i128::from(self.stride))
            .take_while(move |&p| p >= 0 && p < i128::from(total_pages))
            .map(|p| p as u64)
    }
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    last: u64,
    /// Step between the last two requests (0: unknown).
    stride: i64,
    window: u64,
    /// Requests seen when it was last used (for LRU replacement).
    used: u64,
}

/// The window policy: fixed (the old `--prepage-window`) or adaptive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Always `window` pages forward.
    Fixed,
    /// Learnt per stream, between `min` and `max` pages.
    Adaptive,
}

/// Decides what to pre-page after each request.
#[derive(Debug)]
pub struct Prepager {
    policy: Policy,
    min: u64,
    max: u64,
    streams: Vec<Stream>,
    requests: u64,
}

impl Prepager {
    /// A pre-pager; with `Fixed`, every window is `max` pages; `max` 0 disables pre-paging.
    pub fn new(policy: Policy, min: u64, max: u64) -> Self {
        Prepager {
            policy,
            min: min.min(max),
            max,
            streams: Vec::with_capacity(STREAMS),
            requests: 0,
        }
    }

    /// A request for `page` arrived: what to push after it, if anything.
    pub fn on_request(&mut self, page: u64) -> Option<Plan> {
        if self.max == 0 {
            return None;
        }
        if self.policy == Policy::Fixed {
            return Some(Plan {
                first: page + 1,
                stride: 1,
                count: self.max,
            });
        }
        self.requests += 1;
        let now = self.requests;
        let stream = self.stream_for(page);
        stream.last = page;
        stream.used = now;
        let (stride, window) = (stream.stride, stream.window);
        if window == 0 {
            return None;
        }
        let stride = if stride == 0 { 1 } else { stride };
        let first = i128::from(page) + i128::from(stride);
        if first < 0 {
            return None;
        }
        Some(Plan {
            first: first as u64,
            stride,
            count: window,
        })
    }

    /// The stream `page` belongs to, its stride and window updated (see the module docs).
    fn stream_for(&mut self, page: u64) -> &mut Stream {
        let (min, max) = (self.min, self.max);
        let step = |s: &Stream| page as i64 - s.last as i64;
        if let Some(i) = self.streams.iter().position(|s| continues(s, step(s), min)) {
            let s = &mut self.streams[i];
            if s.stride == 0 {
                s.stride = step(s).signum();
            }
            s.window = (s.window * 2).clamp(min.max(1), max);
            return s;
        }
        let teaches =
            |s: &Stream| s.stride == 0 && step(s) != 0 && step(s).unsigned_abs() <= MAX_STRIDE;
        let breaks = |s: &Stream| step(s) != 0 && step(s).unsigned_abs() <= NEAR_PAGES;
        if let Some(i) = self
            .streams
            .iter()
            .position(teaches)
            .or_else(|| self.streams.iter().position(breaks))
        {
            let s = &mut self.streams[i];
            s.stride = page as i64 - s.last as i64;
            s.window = min;
            return s;
        }
        let fresh = Stream {
            last: page,
            stride: 0,
            window: min,
            used: 0,
        };
        if self.streams.len() < STREAMS {
            self.streams.push(fresh);
            return self.streams.last_mut().expect("just pushed");
        }
        let lru = (0..self.streams.len())
            .min_by_key(|&i| self.streams[i].used)
            .expect("STREAMS > 0");
        self.streams[lru] = fresh;
        &mut self.streams[lru]
    }
}

/// Whether a request `step` pages from `s`'s last continues it: in its direction, a whole
/// number of strides, within the window just pushed plus slack. A stream whose stride is not
/// known yet was pushed forward: a small step forward, or one back, continues it.
fn continues(s: &Stream, step: i64, min: u64) -> bool {
    if step == 0 {
        return false;
    }
    if s.stride == 0 {
        return step == -1 || (step > 0 && step.unsigned_abs() <= min + 1);
    }
    if step.signum() != s.stride.signum() || step % s.stride != 0 {
        return false;
    }
    (step / s.stride).unsigned_abs() <= s.window + SLACK_STRIDES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(p: &mut Prepager, pages: impl IntoIterator<Item = u64>) -> Vec<Option<Plan>> {
        pages.into_iter().map(|page| p.on_request(page)).collect()
    }

    #[test]
    fn sequential_faults_grow_the_window_to_the_maximum() {
        let mut p = Prepager::new(Policy::Adaptive, 4, 256);
        let plans = feed(&mut p, 100..110);
        let windows: Vec<u64> = plans.iter().map(|pl| pl.unwrap().count).collect();
        assert_eq!(windows, vec![4, 8, 16, 32, 64, 128, 256, 256, 256, 256]);
        assert_eq!(plans[9].unwrap().first, 110);
        assert_eq!(plans[9].unwrap().stride, 1);
        // With pre-paging working, a sequential guest faults right after each window.
        let mut p = Prepager::new(Policy::Adaptive, 4, 256);
        let mut page = 5000;
        let mut windows = Vec::new();
        for _ in 0..8 {
            let plan = p.on_request(page).unwrap();
            windows.push(plan.count);
            page = plan.first + plan.count;
        }
        assert_eq!(windows, vec![4, 8, 16, 32, 64, 128, 256, 256]);
    }

    #[test]
    fn backward_and_strided_walks_are_followed_in_their_direction() {
        let mut p = Prepager::new(Policy::Adaptive, 2, 64);
        let plans = feed(&mut p, [500, 499, 498, 497]);
        let last = plans[3].unwrap();
        assert_eq!((last.first, last.stride, last.count), (496, -1, 16));
        assert_eq!(
            last.pages(1000).collect::<Vec<_>>(),
            (481..=496).rev().collect::<Vec<_>>()
        );
        let mut p = Prepager::new(Policy::Adaptive, 2, 64);
        let plans = feed(&mut p, [1000, 1300, 1600, 1900, 2200]);
        let last = plans[4].unwrap();
        assert_eq!((last.first, last.stride, last.count), (2500, 300, 16));
        assert_eq!(
            last.pages(3500).collect::<Vec<_>>(),
            vec![2500, 2800, 3100, 3400]
        );
        let mut p = Prepager::new(Policy::Adaptive, 2, 64);
        let plans = feed(&mut p, [0, 8, 16, 24, 32]);
        let last = plans[4].unwrap();
        assert_eq!((last.first, last.stride, last.count), (40, 8, 16));
        // Downwards past page 0: nothing to push there.
        let mut p = Prepager::new(Policy::Adaptive, 2, 64);
        let plans = feed(&mut p, [2, 1, 0]);
        assert_eq!(plans[2], None);
    }

    #[test]
    fn random_faults_keep_the_window_small() {
        let mut p = Prepager::new(Policy::Adaptive, 4, 256);
        // A xorshift walk over 4096 pages: neighbours, learnt strides and breaks all occur.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let pages: Vec<u64> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % 4096
            })
            .collect();
        let plans = feed(&mut p, pages);
        let windows: Vec<u64> = plans.iter().flatten().map(|pl| pl.count).collect();
        let small = windows.iter().filter(|&&w| w <= 8).count();
        assert!(
            small * 100 >= windows.len() * 95,
            "{small} of {}",
            windows.len()
        );
        assert!(windows.iter().all(|&w| w <= 32), "{windows:?}");
    }

    #[test]
    fn a_hot_set_keeps_breaking_strides_and_stays_small() {
        let mut p = Prepager::new(Policy::Adaptive, 2, 256);
        // Faults scattered over 12 pages, in no order.
        let plans = feed(&mut p, [5, 1, 9, 3, 11, 0, 7, 2, 10, 4, 8, 6]);
        let biggest = plans.iter().flatten().map(|pl| pl.count).max().unwrap();
        assert!(biggest <= 4, "{plans:?}");
    }

    #[test]
    fn interleaved_threads_keep_their_own_streams() {
        let mut p = Prepager::new(Policy::Adaptive, 4, 64);
        // Two threads walking forward, far apart, their requests interleaved.
        let pages = (0..8u64).flat_map(|i| [10_000 + i, 500_000 + i]);
        let plans = feed(&mut p, pages);
        let (a, b) = (plans[14].unwrap(), plans[15].unwrap());
        assert_eq!((a.first, a.stride, a.count), (10_008, 1, 64));
        assert_eq!((b.first, b.stride, b.count), (500_008, 1, 64));
    }

    #[test]
    fn fixed_and_disabled_policies() {
        let mut p = Prepager::new(Policy::Fixed, 0, 64);
        assert_eq!(
            p.on_request(7),
            Some(Plan {
                first: 8,
                stride: 1,
                count: 64
            })
        );
        let mut p = Prepager::new(Policy::Adaptive, 4, 0);
        assert_eq!(p.on_request(7), None);
    }
}
