//! `ferry network show`.

use anyhow::{bail, Result};
use clap::Subcommand;
use ferry_agent::api::{ApiReply, ApiRequest};
use ferry_agent::client::Client;

use crate::output::{print_json, print_table};
use crate::Format;

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// The cluster network's range and gateway, and which instance holds
    /// which address on which member.
    Show {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

pub async fn run(client: &Client, command: NetworkCommand) -> Result<()> {
    let NetworkCommand::Show { format } = command;
    let ApiReply::Network(view) = client.call(ApiRequest::Network).await? else {
        bail!("the agent sent an unexpected reply");
    };
    if let Format::Json = format {
        return print_json(&view);
    }
    let Some(subnet) = &view.subnet else {
        println!("this cluster has no cluster network (bootstrap with --cluster-subnet to have one); instances have only their own loopback");
        return Ok(());
    };
    println!("subnet:   {subnet}");
    println!(
        "gateway:  {} (on every member)",
        view.gateway.as_deref().unwrap_or("-")
    );
    println!("leased:   {} of {}", view.leases.len(), view.capacity);
    if !view.leases.is_empty() {
        println!();
        print_table(
            &["ADDRESS", "INSTANCE", "MEMBER"],
            view.leases
                .iter()
                .map(|l| vec![l.address.clone(), l.instance.clone(), l.member.clone()])
                .collect(),
        );
    }
    Ok(())
}
