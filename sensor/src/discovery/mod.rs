//! Finding the code to probe: crypto libraries on the host and in running
//! processes (`targets`), and the functions inside them (`symbols`).
pub mod symbols;
pub mod targets;
