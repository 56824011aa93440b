//! Human tables and JSON for the CLI, and parsing of human durations.

use anyhow::Result;
use ferry_agent::api::{MemberDetail, MemberView, TokenView};
use serde::Serialize;

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub fn print_members(members: &[MemberView]) -> Result<()> {
    let rows = members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.id.to_string(),
                m.address.clone(),
                m.role.clone(),
                if m.leader { "yes" } else { "" }.to_string(),
                m.liveness.clone(),
                match m.cordoned {
                    true => format!("{}, cordoned", m.state),
                    false => m.state.clone(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "NAME", "ID", "ADDRESS", "ROLE", "LEADER", "LIVENESS", "STATE",
        ],
        rows,
    );
    Ok(())
}

/// `cluster show --format json`: the member fields plus `facts` with the
/// names CLI.md gives.
pub fn member_json(detail: &MemberDetail) -> serde_json::Value {
    let mut value = serde_json::to_value(&detail.member).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        if let Some(facts) = &detail.facts {
            object.insert(
                "facts".into(),
                serde_json::to_value(facts).unwrap_or_default(),
            );
        }
        object.insert(
            "admin_certificates".into(),
            serde_json::to_value(&detail.admin_certificates).unwrap_or_default(),
        );
        if let Some(raft) = &detail.raft {
            object.insert(
                "raft".into(),
                serde_json::to_value(raft).unwrap_or_default(),
            );
        }
        if let Some(load) = &detail.load {
            object.insert(
                "load".into(),
                serde_json::to_value(load).unwrap_or_default(),
            );
        }
    }
    value
}

pub fn print_member_detail(detail: &MemberDetail) -> Result<()> {
    let m = &detail.member;
    println!("name:      {}", m.name);
    println!("id:        {}", m.id);
    println!("address:   {}", m.address);
    println!(
        "role:      {}{}",
        m.role,
        if m.leader { " (leader)" } else { "" }
    );
    println!("liveness:  {}", m.liveness);
    println!("state:     {}", m.state);
    if let Some(r) = &detail.raft {
        println!(
            "raft:      term {}, log {}, applied {}, snapshot {}, purged {}",
            r.term, r.last_log_index, r.last_applied_index, r.snapshot_index, r.purged_index
        );
    }
    match &detail.load {
        None => println!("load:      not heard through gossip yet"),
        Some(l) => {
            println!(
                "load:      {:.2} {:.2} {:.2}, {} MiB memory free, {} MiB disk free above the reserve, {} running, agent {} ({:.1}s ago)",
                l.load_average.first().copied().unwrap_or_default(),
                l.load_average.get(1).copied().unwrap_or_default(),
                l.load_average.get(2).copied().unwrap_or_default(),
                l.memory_free_bytes / (1 << 20),
                l.disk_room_bytes / (1 << 20),
                l.running_instances,
                l.agent_version,
                l.age_ms as f64 / 1000.0
            );
        }
    }
    match &detail.facts {
        None => println!("facts:     not reported yet"),
        Some(f) => {
            println!("arch:      {}", f.arch);
            println!("cpu:       {} ({} flags)", f.cpu_model, f.cpu_flags.len());
            println!("kernel:    {} ({} syscalls)", f.kernel, f.syscalls.len());
            println!("fs types:  {}", f.filesystems.join(" "));
            println!("memory:    {} MiB", f.memory_total_bytes / (1 << 20));
            println!("disk:      {} GiB", f.disk_total_bytes / (1 << 30));
            println!(
                "runc:      {}",
                f.runtimes.runc.as_deref().unwrap_or("not installed")
            );
            println!(
                "criu:      {} (criu check {})",
                f.runtimes.criu.as_deref().unwrap_or("not installed"),
                if f.runtimes.criu_check {
                    "passes"
                } else {
                    "fails"
                }
            );
        }
    }
    Ok(())
}

pub fn print_tokens(tokens: &[TokenView]) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rows = tokens
        .iter()
        .map(|t| {
            let left = if t.expires_ms > now {
                format!("{}s", (t.expires_ms - now) / 1000)
            } else {
                "-".into()
            };
            vec![t.name.clone(), t.status.clone(), left]
        })
        .collect();
    print_table(&["NAME", "STATUS", "EXPIRES IN"], rows);
    Ok(())
}

/// "500ms", "90s", "30m", "1h", "2d", or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    match text.trim().strip_suffix("ms") {
        Some(ms) => ms
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms > 0)
            .map(std::time::Duration::from_millis)
            .ok_or_else(|| format!("'{text}' is not a duration like 500ms")),
        None => parse_duration_secs(text).map(std::time::Duration::from_secs),
    }
}

/// "90s", "30m", "1h", "2d", or a bare number of seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 90s, 30m, 1h or 2d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("'{text}': unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("'{text}' is out of range"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_secs;

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("2d"), Ok(172800));
        assert!(parse_duration_secs("0s").is_err());
        assert!(parse_duration_secs("1y").is_err());
        assert!(parse_duration_secs("h").is_err());
        assert_eq!(
            super::parse_duration("250ms"),
            Ok(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            super::parse_duration("2s"),
            Ok(std::time::Duration::from_secs(2))
        );
        assert!(super::parse_duration("0ms").is_err());
    }
}
