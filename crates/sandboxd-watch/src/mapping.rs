//! From an inotify event mask to envd's event kinds, in envd's order.
//!
//! The kernel sets one event bit per `struct inotify_event` (plus flags such as `IN_ISDIR`), but a
//! mask may in principle carry several. envd (through fsnotify) turns one event with several ops
//! into one `FilesystemEvent` per op, in the fixed order CREATE, RENAME, CHMOD, WRITE, REMOVE; this
//! module keeps that order whatever the mask holds.

use inotify::EventMask;

use crate::event::EventKind;

/// Each envd kind and the inotify bits that produce it, in the order envd emits them.
const ENVD_ORDER: [(EventKind, EventMask); 5] = [
    (
        EventKind::Create,
        EventMask::CREATE.union(EventMask::MOVED_TO),
    ),
    (
        EventKind::Rename,
        EventMask::MOVED_FROM.union(EventMask::MOVE_SELF),
    ),
    (EventKind::Chmod, EventMask::ATTRIB),
    (EventKind::Write, EventMask::MODIFY),
    (
        EventKind::Remove,
        EventMask::DELETE.union(EventMask::DELETE_SELF),
    ),
];

/// The envd kinds that `mask` stands for, in envd's order; empty for masks that map to no event
/// (`IN_IGNORED`, `IN_UNMOUNT`, `IN_Q_OVERFLOW`).
pub(crate) fn kinds(mask: EventMask) -> impl Iterator<Item = EventKind> {
    ENVD_ORDER
        .into_iter()
        .filter(move |(_, bits)| mask.intersects(*bits))
        .map(|(kind, _)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(mask: EventMask) -> Vec<EventKind> {
        kinds(mask).collect()
    }

    #[test]
    fn single_ops_map_like_envd() {
        assert_eq!(collect(EventMask::CREATE), [EventKind::Create]);
        assert_eq!(collect(EventMask::MOVED_TO), [EventKind::Create]);
        assert_eq!(collect(EventMask::MODIFY), [EventKind::Write]);
        assert_eq!(collect(EventMask::DELETE), [EventKind::Remove]);
        assert_eq!(collect(EventMask::DELETE_SELF), [EventKind::Remove]);
        assert_eq!(collect(EventMask::MOVED_FROM), [EventKind::Rename]);
        assert_eq!(collect(EventMask::MOVE_SELF), [EventKind::Rename]);
        assert_eq!(collect(EventMask::ATTRIB), [EventKind::Chmod]);
    }

    #[test]
    fn flags_do_not_change_the_kind() {
        assert_eq!(
            collect(EventMask::CREATE | EventMask::ISDIR),
            [EventKind::Create]
        );
        assert!(collect(EventMask::IGNORED).is_empty());
        assert!(collect(EventMask::Q_OVERFLOW).is_empty());
        assert!(collect(EventMask::UNMOUNT).is_empty());
    }

    #[test]
    fn several_ops_come_out_in_envd_order() {
        let all = EventMask::DELETE
            | EventMask::MODIFY
            | EventMask::ATTRIB
            | EventMask::MOVED_FROM
            | EventMask::CREATE;
        assert_eq!(
            collect(all),
            [
                EventKind::Create,
                EventKind::Rename,
                EventKind::Chmod,
                EventKind::Write,
                EventKind::Remove
            ]
        );
    }
}
