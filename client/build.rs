// Makes the client's binaries run without `LD_LIBRARY_PATH`, and keep CUDA.
//
// torch-sys tells its direct dependents where the libtorch it linked lives
// (`DEP_TCH_LIBTORCH_LIB`). We bake that folder into the binaries as an rpath, and force a
// `DT_NEEDED` entry for `libtorch_cuda.so` when it exists: nothing in our code references a
// CUDA symbol, so with the default `--as-needed` the linker would drop the library and
// `tch::Cuda::is_available()` would say false on a GPU machine.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    for cuda in ["torch_cuda"] {
        if std::path::Path::new(&lib).join(format!("lib{cuda}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l{cuda},--as-needed");
        }
    }
}
