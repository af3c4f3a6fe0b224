//! Key identity: which private key made a signature.
//!
//! `material` turns key and certificate files into public keys and SPKI
//! hashes; `verify` checks a captured signature against a public key;
//! `identify` decides, per signing event, which known key it was, and
//! `inventory` keeps what is known of every key seen (where it was found,
//! its certificates, who signed with it), across restarts;
//! `safe_open` opens the files untrusted processes name; `reader` reads the
//! key files processes opened, off the event thread. `recover` finds the
//! possible keys of an ECDSA signature; `search` looks for a signing
//! process's keys that no file the sensor saw gave (files it holds open:
//! `held_open`; its TLS listeners' certificates: `tls_probe`); `scan` reads
//! the places servers keep keys at start. `sexp` reads libgcrypt's
//! S-expressions, whose key names itself.
pub mod held_open;
pub mod identify;
pub mod inventory;
pub mod material;
pub mod reader;
pub mod recover;
pub mod safe_open;
pub mod scan;
pub mod search;
pub mod sexp;
pub mod tls_probe;
pub mod verify;
