use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = alarms::Cli::parse();
    infra::serve::init_tracing(cli.log.log_format);
    alarms::run(cli).await
}
