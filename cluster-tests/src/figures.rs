//! The benchmarks' figures in a form `bench` collects: each bench prints
//! its own lines for a reader, and with every figure one line
//! `FIGURE<TAB>what<TAB>value<TAB>floor or peer<TAB>target`, which `bench`
//! gathers into one table.

/// The prefix of a figure line.
pub const PREFIX: &str = "FIGURE\t";

/// Print one figure for `bench` (tabs in the texts become spaces).
pub fn report(what: &str, value: &str, beside: &str, target: &str) {
    let clean = |s: &str| s.replace('\t', " ");
    println!(
        "{PREFIX}{}\t{}\t{}\t{}",
        clean(what),
        clean(value),
        clean(beside),
        clean(target)
    );
}

/// One figure read back from a bench's output line.
#[derive(Debug, PartialEq, Eq)]
pub struct Figure {
    pub what: String,
    pub value: String,
    pub beside: String,
    pub target: String,
}

/// The figure on `line`, if it is a figure line.
pub fn parse(line: &str) -> Option<Figure> {
    let mut parts = line.strip_prefix(PREFIX)?.split('\t');
    let mut next = || parts.next().unwrap_or("").to_string();
    Some(Figure {
        what: next(),
        value: next(),
        beside: next(),
        target: next(),
    })
}

/// The figures as a table, columns padded to their widest cell.
pub fn table(figures: &[Figure]) -> String {
    let header = ["figure", "value", "floor or peer", "target"];
    let rows: Vec<[&str; 4]> = figures
        .iter()
        .map(|f| [&*f.what, &*f.value, &*f.beside, &*f.target])
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join(" | ").trim_end().to_string()
    };
    let mut out = vec![line(header)];
    out.push(widths.map(|w| "-".repeat(w)).join("-|-"));
    out.extend(rows.into_iter().map(line));
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_line_parses_back_and_other_lines_do_not() {
        let line = format!("{PREFIX}commit p50\t2.1 ms\tread 0.3 ms\t<= 1.5 ms");
        let figure = parse(&line).unwrap();
        assert_eq!(figure.what, "commit p50");
        assert_eq!(figure.target, "<= 1.5 ms");
        assert_eq!(parse("commit latency over 1000 commits"), None);
    }

    #[test]
    fn the_table_lines_up_its_columns() {
        let figures = vec![
            parse(&format!("{PREFIX}a\t1\tfloor\t<= 2")).unwrap(),
            parse(&format!("{PREFIX}longer figure\t10 ms\t-\t-")).unwrap(),
        ];
        let text = table(&figures);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let bar = lines[0].find('|').unwrap();
        assert!(
            lines[2..].iter().all(|l| l.find('|') == Some(bar)),
            "{text}"
        );
    }
}
