pub fn main(_a: DemoArgs) -> anyhow::Result<()> { todo!() }
#[derive(clap::Args, Debug)] pub struct DemoArgs {}
