use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = loadtest::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    loadtest::run(config, infra::shutdown::on_signal()).await
}
