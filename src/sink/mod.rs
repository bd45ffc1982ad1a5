//! Sinks: where backup bytes end up.
//!
//! [`seam`] is the interface every method writes through (entries, file bytes by offset,
//! labels, the manifest last); [`dir`] is the plain-directory sink, the one with random
//! access; [`digest`] is the manifest tee that checksums bytes as they pass; [`plain`] holds
//! the plain format's path and mode rules (`-T` mappings, safe relative paths, modes);
//! [`gate`] stops every writer of a failed backup before its files are removed.
//! Sinks run on the writer threads behind bounded channels, so receiving never waits on the
//! disk in lockstep and memory stays bounded whatever the cluster's size. A sequential sink
//! (tar, compression, an object store) is one more file here: see [`seam`].

pub mod digest;
pub mod dir;
pub mod gate;
pub mod plain;
pub mod seam;

pub use seam::{Entry, FileId, FileWriter, Kind, Root, Sink, SinkStats};
