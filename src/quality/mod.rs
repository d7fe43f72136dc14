//! Data quality: the rules (SQL conditions a row must meet, checked when
//! the config loads), splitting the rows into good and bad with them, and
//! the gates that stop a run before it publishes data that looks wrong, and
//! a few of the rows each rule caught, for the report page.
//!
//! May call: the config, the workbench, [`crate::source`] (to check rules
//! against the source's columns), [`crate::files`]' file records,
//! [`crate::error`]. Nothing of the run.

pub mod gates;
pub mod rules;
pub mod samples;
pub mod validate;
