//! Attribution: who made a key use (`process`), in which container
//! (`container`; its Kubernetes names: `pods`), and for which network
//! peer. `kernel_layout` tells the probes where the kernel keeps a
//! socket's addresses and an executable's inode.
pub mod container;
pub mod kernel_layout;
pub mod pods;
pub mod process;
pub mod sockets;
