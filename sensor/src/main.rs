mod keys;
fn main() {}
