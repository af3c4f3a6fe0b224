//! Finding the code to probe: crypto libraries on the host and in running
//! processes (`targets`), the functions inside them (`symbols`), and the
//! instruction to probe in each (`placement`).
pub mod placement;
pub mod symbols;
pub mod targets;
