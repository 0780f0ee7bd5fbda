//! The bounded buffer of items waiting for the caller's next batch.
//!
//! The kernel bounds its own queue (`max_queued_events`) and says so with `IN_Q_OVERFLOW`. Our side
//! can grow on its own, though: scanning a directory that appeared with many entries in it reports
//! one CREATE per entry. This buffer stops at a cap and counts what it drops instead, and the count
//! comes out as an [`Item::Overflow`] at the point the loss began, as a kernel overflow would.

use std::path::Path;

use crate::event::{Event, EventKind, Item};

/// Default cap on pending events per watcher. 4× the kernel's default `max_queued_events` (16384),
/// so one full kernel queue plus the scan of a large new directory fit in one batch; at roughly
/// 100 bytes an event that bounds a watcher's pending memory near 6 MiB.
pub const DEFAULT_PENDING_CAP: usize = 65_536;

/// Items waiting for the next batch.
pub(crate) struct Pending {
    items: Vec<Item>,
    cap: usize,
    /// Events dropped since the buffer filled; reported as one `Overflow` before the next control
    /// item or at the end of the batch.
    dropped: u64,
}

impl Pending {
    /// An empty buffer that holds at most `cap` events (control items always fit).
    pub(crate) fn new(cap: usize) -> Self {
        Pending {
            items: Vec::new(),
            cap: cap.max(1),
            dropped: 0,
        }
    }

    /// Adds an event for `path` (relative to the root), or counts it as dropped if the buffer is full.
    pub(crate) fn event(&mut self, path: &Path, kind: EventKind) {
        if self.items.len() >= self.cap || self.dropped > 0 {
            self.dropped += 1;
            return;
        }
        let name = path.to_string_lossy().into_owned();
        self.items.push(Item::Event(Event { name, kind }));
    }

    /// Adds an event with a fixed name (the root's).
    pub(crate) fn event_named(&mut self, name: &str, kind: EventKind) {
        self.event(Path::new(name), kind);
    }

    /// Adds an `Overflow` or `Closed` item, after the marker for anything dropped so far.
    pub(crate) fn control(&mut self, item: Item) {
        self.flush_dropped();
        self.items.push(item);
    }

    /// Whether the reader should leave the kernel queue alone for now: events are being dropped
    /// already, or one more full `read(2)` might not fit. An empty buffer always takes one read,
    /// whatever the cap, so that a batch is never empty while the kernel has events.
    pub(crate) fn is_nearly_full(&self, per_read: usize) -> bool {
        self.dropped > 0 || (!self.items.is_empty() && self.items.len() + per_read > self.cap)
    }

    /// Takes everything waiting, in order.
    pub(crate) fn take(&mut self) -> Vec<Item> {
        self.flush_dropped();
        std::mem::take(&mut self.items)
    }

    fn flush_dropped(&mut self) {
        if self.dropped > 0 {
            self.items.push(Item::Overflow {
                dropped_hint: Some(self.dropped),
            });
            self.dropped = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_past_the_cap_and_reports_the_count_in_place() {
        let mut pending = Pending::new(2);
        for name in ["a", "b", "c", "d"] {
            pending.event(Path::new(name), EventKind::Create);
        }
        pending.control(Item::Closed);
        let items = pending.take();
        assert_eq!(items.len(), 4);
        assert_eq!(
            items[2],
            Item::Overflow {
                dropped_hint: Some(2)
            }
        );
        assert_eq!(items[3], Item::Closed);
        assert!(pending.take().is_empty());
    }
}
