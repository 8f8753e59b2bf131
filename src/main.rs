fn main() {
    std::process::exit(dmabuf_fs::cli::main());
}
