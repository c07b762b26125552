use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ingest::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    ingest::run(config, infra::shutdown::on_signal()).await
}
