//! The `shoal` package's library: what the command shares with the workspace's
//! process tests. Only the local cluster's process layout (`shoal dev` and the
//! multi-process harness start the same processes with the same flags).

pub mod layout;
