//! Finding the code to probe: ELF files mapped by running processes or
//! sitting in the host's library directories (`targets`), the signing
//! functions inside each, for every stack keywarden knows (`signing_code`,
//! which reads files through `elf_read` and names functions by `symbols`),
//! and the instruction to probe in each (`placement`; for Go programs,
//! `go` finds and places both).
pub mod elf_read;
pub mod go;
pub mod placement;
pub mod signing_code;
pub mod symbols;
pub mod targets;
