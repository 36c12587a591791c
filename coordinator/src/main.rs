//! `fedtune-coordinator` binary.

fn main() -> anyhow::Result<()> {
    println!("fedtune-coordinator");
    Ok(())
}
