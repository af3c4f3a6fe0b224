//! Key identity: which private key made a signature.
//!
//! `material` turns key and certificate files into public keys and SPKI
//! hashes; `verify` checks a captured signature against a public key;
//! `identify` decides, per signing event, which known key it was;
//! `safe_open` opens the files untrusted processes name; `reader` reads the
//! key files processes opened, off the event thread.
pub mod identify;
pub mod material;
pub mod reader;
pub mod safe_open;
pub mod verify;
