//! How a frame's pages are written into the cache file: in runs that follow each other both
//! in the frame and in the image.

/// Runs of `users` (a frame's (slot, 4 KiB page) pairs, pages ascending) whose slots and
/// pages both go up by one: (first slot, first page, pages in the run).
pub(super) fn contiguous_runs(
    users: &[(u16, u64)],
) -> impl Iterator<Item = (u16, u64, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let &(slot, page) = users.get(at)?;
        let mut len = 1;
        while let Some(&(s, p)) = users.get(at + len)
            && usize::from(s) == usize::from(slot) + len
            && p == page + len as u64
        {
            len += 1;
        }
        at += len;
        Some((slot, page, len))
    })
}

#[cfg(test)]
mod tests {
    use super::contiguous_runs;

    #[test]
    fn test_runs_break_where_slots_or_pages_jump() {
        let runs = |users: &[(u16, u64)]| contiguous_runs(users).collect::<Vec<_>>();
        assert_eq!(runs(&[]), vec![]);
        // A whole frame of consecutive pages: one run.
        let whole: Vec<(u16, u64)> = (0..16).map(|i| (i, 100 + u64::from(i))).collect();
        assert_eq!(runs(&whole), vec![(0, 100, 16)]);
        // A page gap (a zero page left out of the frame), then a slot jump (a page of
        // another frame between), then a page that goes back in slot order.
        assert_eq!(
            runs(&[
                (0, 10),
                (1, 11),
                (2, 13),
                (3, 14),
                (5, 15),
                (6, 16),
                (4, 20)
            ]),
            vec![(0, 10, 2), (2, 13, 2), (5, 15, 2), (4, 20, 1)]
        );
        // A slot reused by two pages (the same bytes in two places): two runs.
        assert_eq!(runs(&[(7, 1), (7, 2)]), vec![(7, 1, 1), (7, 2, 1)]);
    }
}
