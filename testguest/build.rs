//! Builds the test guest from `guest/` with the host's gcc and ld: no guest
//! binary is ever checked in.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 2] = ["entry.S", "main.c"];
const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let guest_dir = manifest_dir.join("guest");
    println!("cargo:rerun-if-changed={}", guest_dir.display());

    let mut objects = Vec::new();
    for source in SOURCES {
        let object = out_dir.join(format!("{source}.o"));
        run(Command::new("gcc").args(CFLAGS).arg("-c").arg(guest_dir.join(source)).arg("-o").arg(&object));
        objects.push(object);
    }
    let kernel = out_dir.join("metald-testguest.elf");
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-nostdlib", "-static", "-no-pie", "--no-warn-rwx-segments"])
        .arg("-T")
        .arg(guest_dir.join("guest.ld"))
        .args(&objects)
        .arg("-o")
        .arg(&kernel));
    println!("cargo:rustc-env=METALD_TESTGUEST_KERNEL={}", kernel.display());
}

fn run(command: &mut Command) {
    let shown = format!("{command:?}");
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("building the test guest failed ({status}): {shown}"),
        Err(error) => panic!("cannot run the test guest's toolchain ({error}): {shown}; install gcc and binutils"),
    }
}
