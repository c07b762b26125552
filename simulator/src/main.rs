use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = simulator::Config::parse();
    if config.print_credentials {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        simulator::print_credentials(&config, &mut out)?;
        return Ok(std::io::Write::flush(&mut out)?);
    }
    infra::serve::init_tracing(config.log.log_format);
    let summary = simulator::run(config, infra::shutdown::on_signal()).await?;
    println!("{summary}");
    Ok(())
}
