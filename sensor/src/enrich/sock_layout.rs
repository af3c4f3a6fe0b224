//! Where `struct sock` keeps a connection's addresses, read from the
//! running kernel's BTF.
//!
//! The probes name the peer of a signature by reading the socket the
//! signing thread last received on. Rust eBPF programs have no CO-RE
//! relocations, so the field offsets come from `/sys/kernel/btf/vmlinux`
//! at start and reach the probes through the `SOCK_LAYOUT` map. The fields
//! live in `struct sock_common`, the first member of every `struct sock`,
//! partly inside anonymous unions and structs.

use anyhow::{Context, Result, anyhow};
use btf_rs::{Btf, Type};
use hashbrown::HashMap;
use keywarden_probe_types::SockLayout;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of every named field, descending into anonymous members.
fn fields(btf: &Btf, s: &btf_rs::Struct, base_bits: u32, out: &mut HashMap<String, u32>) {
    for m in &s.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if !name.is_empty() {
            out.entry(name).or_insert(bits / 8);
            continue;
        }
        // Anonymous: follow typedefs and qualifiers to the struct or union.
        let mut ty = btf.resolve_chained_type(m).ok();
        for _ in 0..8 {
            match ty {
                Some(Type::Struct(ref inner)) | Some(Type::Union(ref inner)) => {
                    fields(btf, inner, bits, out);
                    break;
                }
                Some(ref t @ (Type::Typedef(_) | Type::Const(_) | Type::Volatile(_))) => {
                    ty = t
                        .as_btf_type()
                        .and_then(|b| btf.resolve_chained_type(b).ok());
                }
                _ => break,
            }
        }
    }
}

pub fn from_kernel() -> Result<SockLayout> {
    let btf = Btf::from_file(VMLINUX).map_err(|e| anyhow!("{VMLINUX}: {e}"))?;
    let common = btf
        .resolve_types_by_name("sock_common")
        .map_err(|e| anyhow!("{VMLINUX}: struct sock_common: {e}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .context("struct sock_common is not a struct in the kernel's BTF")?;
    let mut f = HashMap::new();
    fields(&btf, &common, 0, &mut f);
    let get = |name: &str| {
        f.get(name)
            .copied()
            .with_context(|| format!("struct sock_common has no field {name} in the kernel's BTF"))
    };
    Ok(SockLayout {
        valid: 1,
        daddr: get("skc_daddr")?,
        rcv_saddr: get("skc_rcv_saddr")?,
        dport: get("skc_dport")?,
        num: get("skc_num")?,
        family: get("skc_family")?,
        state: get("skc_state")?,
        v6_daddr: get("skc_v6_daddr")?,
        v6_rcv_saddr: get("skc_v6_rcv_saddr")?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of sock_common has been stable for years; the point of
    /// reading BTF is kernels where it is not, but here the known offsets
    /// check the walk through the anonymous unions.
    #[test]
    fn reads_sock_common_from_this_kernel() {
        let l = from_kernel().unwrap();
        assert_eq!((l.daddr, l.rcv_saddr), (0, 4));
        assert_eq!((l.dport, l.num, l.family, l.state), (12, 14, 16, 18));
        assert!(
            l.v6_daddr >= 24 && l.v6_rcv_saddr == l.v6_daddr + 16,
            "{l:?}"
        );
    }
}
