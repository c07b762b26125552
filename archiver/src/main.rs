use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let config = archiver::Config::parse();
    let log = match &config.command {
        archiver::Command::Run(args) => &args.log,
        archiver::Command::Rollups(args) => &args.log,
    };
    infra::serve::init_tracing(log.log_format);
    let ok = archiver::run(config, infra::shutdown::on_signal()).await?;
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
