fn main() {
    std::process::exit(lamcr::cli::main());
}
