fn main() -> std::process::ExitCode {
    freeski_bot::cli::main()
}
