//! The test binaries link libtorch through fedtune-client: reuse the client's rpath logic.
include!("../client/build.rs");
