//! The `harbor` command's tools besides serving, in the binary only: `harbor ctl` (the admin
//! API at a shell), and the strategy author's offline tools: `check` (load and exercise one
//! component), `simulate` (drive one or two through a synthetic run) and the replay of a
//! recorded trace (`simulate --trace`).

pub mod check;
pub mod ctl;
pub mod replay;
pub mod simulate;
