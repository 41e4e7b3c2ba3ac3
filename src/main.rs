fn main() {
    std::process::exit(cred_watch::cli::run());
}
