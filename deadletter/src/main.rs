use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = deadletter::Cli::parse();
    infra::serve::init_tracing(cli.log.log_format);
    let ok = deadletter::run(cli, infra::shutdown::on_signal()).await?;
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
