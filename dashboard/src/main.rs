use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = dashboard::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    dashboard::run(config, infra::shutdown::on_signal()).await
}
