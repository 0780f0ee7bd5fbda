//! What a watcher hands its caller: envd's filesystem events, plus the two things the kernel can
//! say about the watch itself (its queue overflowed; the watched directory is gone).

/// The path reported for the watched directory itself, as envd reports it (`filepath.Rel(root, root)`).
pub const ROOT_NAME: &str = ".";

/// envd's `filesystem.EventType`, without `EVENT_TYPE_UNSPECIFIED`.
///
/// The discriminants are the protobuf enum numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    /// `EVENT_TYPE_CREATE` (1): `IN_CREATE` or `IN_MOVED_TO`, or an entry found by scanning a new directory.
    Create = 1,
    /// `EVENT_TYPE_WRITE` (2): `IN_MODIFY`.
    Write = 2,
    /// `EVENT_TYPE_REMOVE` (3): `IN_DELETE`, or `IN_DELETE_SELF` of the watched directory.
    Remove = 3,
    /// `EVENT_TYPE_RENAME` (4): `IN_MOVED_FROM`, or `IN_MOVE_SELF` of the watched directory.
    Rename = 4,
    /// `EVENT_TYPE_CHMOD` (5): `IN_ATTRIB`.
    Chmod = 5,
}

impl EventKind {
    /// The protobuf enum number of `filesystem.EventType`.
    pub const fn number(self) -> i32 {
        self as i32
    }

    /// The protobuf enum name, as it appears in Connect JSON (`"EVENT_TYPE_CREATE"`).
    pub const fn proto_name(self) -> &'static str {
        match self {
            EventKind::Create => "EVENT_TYPE_CREATE",
            EventKind::Write => "EVENT_TYPE_WRITE",
            EventKind::Remove => "EVENT_TYPE_REMOVE",
            EventKind::Rename => "EVENT_TYPE_RENAME",
            EventKind::Chmod => "EVENT_TYPE_CHMOD",
        }
    }
}

/// One filesystem event, shaped like envd's `FilesystemEvent` without its optional entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event {
    /// The path relative to the watched directory, with `/` between components (`sub/a.txt`), or
    /// [`ROOT_NAME`] for the watched directory itself. Bytes that are not UTF-8 are replaced with U+FFFD.
    pub name: String,
    /// What happened.
    pub kind: EventKind,
}

/// One element of a batch returned by [`Watcher::read_batch`](crate::Watcher::read_batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A filesystem event.
    Event(Event),
    /// Events were lost at this point of the stream: the kernel queue overflowed (`IN_Q_OVERFLOW`,
    /// `dropped_hint` is `None`: the kernel does not say how many), or this watcher's own pending
    /// buffer was full (`dropped_hint` counts the events it dropped). After a kernel overflow the
    /// watcher has already rescanned the tree, so watching continues.
    Overflow {
        /// How many events were dropped, when known.
        dropped_hint: Option<u64>,
    },
    /// The watched directory was deleted, moved or unmounted. This is the last item the watcher
    /// returns; [`Watcher::is_closed`](crate::Watcher::is_closed) is true from now on.
    Closed,
}

impl Item {
    /// The event, if this item is one.
    pub fn as_event(&self) -> Option<&Event> {
        match self {
            Item::Event(event) => Some(event),
            _ => None,
        }
    }
}
