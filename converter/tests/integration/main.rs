//! Integration tests of the converter: library builds read back with `rafs::read`, and the
//! `nydus-image` binary end to end.

mod bad_images;
mod bad_input;
mod cli;
mod common;
mod determinism;
mod dir_source;
mod erofs;
mod golden;
mod merge;
mod progress;
mod tar_source;
mod whiteouts;
