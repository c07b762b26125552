use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = simulator::Config::parse();
    infra::serve::init_tracing(config.log.log_format);
    let summary = simulator::run(config, infra::shutdown::on_signal()).await?;
    println!("{summary}");
    Ok(())
}
