//! `fedtune-client` binary.

fn main() -> anyhow::Result<()> {
    let cuda = tch::Cuda::is_available();
    println!("fedtune-client (cuda available: {cuda})");
    Ok(())
}
