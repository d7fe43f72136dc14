//! The bucket: S3 (Backblaze B2) requests judged by our own code, publishing
//! the run's files (skipping unchanged content, verifying, multipart
//! uploads and their clean-up) and the manifest written last.
//!
//! May call: the config, [`crate::files`]' file records, [`crate::error`]
//! and [`crate::retry`]. Nothing of the run.

pub mod manifest;
pub mod publish;
pub mod s3_api;
