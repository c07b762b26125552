use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let config = archiver::Config::parse();
    let archiver::Command::Run(args) = &config.command;
    infra::serve::init_tracing(args.log.log_format);
    let ok = archiver::run(config, infra::shutdown::on_signal()).await?;
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
