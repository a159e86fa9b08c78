//! `verify` at the CLI edge: one line per problem, then a summary; exit 1 when anything is wrong.

use std::process::ExitCode;
use std::sync::Arc;

use super::human_bytes;
use crate::repo::Repository;
use crate::verify;

/// `verify`: re-reads the whole repository.
pub(super) async fn verify(repo: Arc<Repository>, concurrency: usize) -> anyhow::Result<ExitCode> {
    let report = verify::verify_all(Arc::clone(&repo), concurrency).await?;
    if report.empty {
        // Not a success: a mistyped S3 prefix looks exactly like this.
        println!(
            "verify: {} is an empty repository: nothing archived yet (check the repository URL if \
             there should be)",
            repo.url()
        );
        return Ok(ExitCode::from(1));
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    // Rotation: an old identity may be destroyed once no object is encrypted to its key.
    for (key, objects) in &report.keys {
        println!("verify: key {key}: {objects} objects encrypted to it");
    }
    if !report.keys.is_empty() {
        println!("verify: {} objects unencrypted", report.plain);
    }
    println!(
        "verify: {} objects checked ({} WAL files, {} of content), {} problems",
        report.checked,
        report.wal_files,
        human_bytes(report.content_bytes),
        report.problems.len()
    );
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
