fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keywarden-probes"));
    let mut ebpf = aya::Ebpf::load(obj).expect("load");
    for (name, prog) in ebpf.programs_mut() {
        println!("{name}");
        match prog {
            aya::programs::Program::UProbe(p) => p.load().unwrap(),
            aya::programs::Program::TracePoint(p) => p.load().unwrap(),
            _ => {}
        }
    }
}
