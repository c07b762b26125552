use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = processor::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    processor::run(config, infra::shutdown::on_signal()).await
}
