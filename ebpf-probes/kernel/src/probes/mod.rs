//! The programs, one file per family. Each program is a `pub fn` under
//! its aya-ebpf attribute, which gives it an unmangled symbol in the ELF
//! section of its program type: the sensor finds it by that name.
mod gcrypt;
mod go;
mod network;
mod opens;
mod process;
mod signing;
